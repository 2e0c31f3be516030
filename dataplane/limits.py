"""Limits and sizes, each named for what it bounds (one place, as in WireGuard)."""

MIN_BLOCK_SIZE = 32                 # smallest local key block a source may deliver
MAX_BLOCK_SIZE = 16 << 20           # largest local key block (one agreement decision)
MAX_RING_CAPACITY = 4 << 30         # key bytes one ring may hold
RING_HEADER_SIZE = 4096             # one page of cursors before the key bytes
MAX_PENDING_BLOCKS = 65536          # blocks an end holds while their fate is undecided
MAX_PENDING_BYTES = 256 << 20       # ... and their total size
PENDING_BLOCK_TIMEOUT_S = 5.0       # an undecided block older than this is discarded
MAX_AGREEMENT_FRAME = 1 << 20       # largest agreement message on the wire
EMULATOR_QUEUE_BLOCKS = 64          # blocks the emulator buffers per slow end, then drops
MAX_UNDERLAY_MTU = 65535          # veth MTU of the emulated underlay
