"""Settings for the whole test session."""

import os

# UCX (under NIXL) warns at interpreter exit about request objects of transfers whose peer a test
# killed on purpose; kvrelay's own handles are counted by the tests.  Keep the test log readable.
os.environ.setdefault("UCX_LOG_LEVEL", "error")
