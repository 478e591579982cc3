"""Files and processes, knowing nothing of LORS: model sources (:mod:`.sources`), safetensors
reading and sharded writing (:mod:`.safetensors`), atomic outputs (:mod:`.atomic`) and ``torchrun``
ranks (:mod:`.dist`)."""
