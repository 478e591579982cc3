"""Discovery: find the stacks of identically-shaped sibling submodules (:mod:`.stacks`), decide what
each stacked parameter becomes (:mod:`.plan`), and which are parameter generators (:mod:`.generators`).
Structure only: works on the meta device and never touches weight values."""
