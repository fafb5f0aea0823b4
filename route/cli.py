"""The command-line tools' last word on a failure (`cli.run(main)`): one line naming what is at fault.

Errors a user can cause (a missing or malformed file, a bad option, a failed fetch) end in `error: <message>`
on stderr and exit status 1. Ctrl-C ends in `interrupted` and status 130, after the interrupt has travelled up
as an exception, so every `finally` and `with` on the way has cleaned up. ROUTE_DEBUG=1 shows the traceback.
"""
import os
import sys

# RuntimeError: route.hub.FetchError, and torch's own (out of memory, a device that is not there)
ERRORS = (OSError, ValueError, KeyError, RuntimeError)


def run(main, *args):
    try:
        return main(*args)
    except KeyboardInterrupt:
        if os.environ.get("ROUTE_DEBUG"):
            raise
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except ERRORS as e:
        if os.environ.get("ROUTE_DEBUG"):
            raise
        message = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # str(KeyError) adds quotes
        sys.exit(f"error: {' '.join(str(message).split())}")  # one line, whatever the message held
