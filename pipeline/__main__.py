import os
import sys

from pipeline.cli import main
from pipeline.processes import in_launched_process

code = main()
if in_launched_process():
    # A training rank ends here without tearing its process group down. Torn down, gloo's threads either abort
    # the interpreter at exit ("terminate called without an active exception") or, when the DDP reducer drops
    # the group's last reference with the GIL held while a gloo thread waits for the GIL to free a finished
    # allgather, hang the rank for good (seen 1 run in 6 on 2 cores). Everything it writes is written
    # atomically and closed by now; only the streams need flushing.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
