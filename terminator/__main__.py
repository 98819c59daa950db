import os
import sys

from .cli import main

code = main()
if int(os.environ.get("WORLD_SIZE", "1")) > 1:
    # A torchrun worker whose work is done and written: torch.distributed's C++ teardown
    # during interpreter shutdown can still abort it, so it leaves without running it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
