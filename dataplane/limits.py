"""Limits and sizes, each named for what it bounds (one place, as in WireGuard)."""

MIN_BLOCK_SIZE = 32                 # smallest local key block a source may deliver
MAX_BLOCK_SIZE = 16 << 20           # largest local key block (one agreement decision)
MAX_RING_CAPACITY = 4 << 30         # key bytes one ring may hold
RING_HEADER_SIZE = 4096             # one page of cursors before the key bytes
MAX_PENDING_BLOCKS = 65536          # blocks an end holds while their fate is undecided
MAX_PENDING_BYTES = 256 << 20       # ... and their total size
PENDING_BLOCK_TIMEOUT_S = 30.0      # an undecided block older than this is discarded: how
                                    # long one end's source may be away (a device's or key
                                    # manager's restart, reconnects backing off 1, 2, 4, 8 s)
                                    # before the blocks the other end took meanwhile are lost
NOTED_BLOCK_TIMEOUT_S = 5.0         # ... for ETSI 014 devices: the follower finds a block's
                                    # keys by the leader's note, sent once, so a block whose
                                    # note it lost (restarted) is lost, and the leader's window
                                    # of undecided blocks waits no longer than this for it
MAX_AGREEMENT_FRAME = 1 << 20       # largest agreement message on the wire
MAX_KEYS_PER_NOTE = 1024            # device keys one block may be made of (one enc_keys call)
EMULATOR_QUEUE_BLOCKS = 64          # blocks the emulator buffers per slow end, then drops
MAX_UNDERLAY_MTU = 65535            # veth MTU of the emulated underlay
MAX_WORKERS = 63                    # OTP workers per link end (ring lanes 0..62; 63 = control)
MIN_MTU = 576                       # smallest TUN MTU (IPv4 minimum datagram)
CONVENTIONAL_MTU = 1500             # the paper's conventional tunnel
MIN_CHUNK = 4096                    # smallest key chunk a worker claims at once
IDLE_RETIRE_S = 0.05                # a worker idle this long gives back its chunk
LINK_DEAD_S = 1.0                   # no keepalive from the peer for this long: link down
LINK_DEAD_MAX_S = 3.0               # ... or longer, if its keepalives came late before
UP_AFTER_KEEPALIVES = 3             # keepalives in a row, each in time, to be up again
STALL_EXCUSE_S = 0.25               # own loop held up longer than this: the rest excused
KEEPALIVE_S = 0.2                   # keepalive period of a tunnel manager (the shortest)
KEEPALIVE_MAX_S = 10.0              # ... the longest, on the slowest links (see sizing)
KEEPALIVE_SHARE = 0.02              # of a direction's key keepalives may take, where the
                                    # shortest period would take more (links below ~1 Mb/s)
LSA_MAX_AGE_S = 5.0                 # a link-state entry not refreshed this long is dropped
LSDB_REFRESH_S = 1.0                # keepalives carry the link-state database this often
MAX_COST = 64                       # a link's highest routing cost (the driest, slowest)
RELEASE_GRACE_S = 0.1               # DEC key is freed this long after the peer released it
CONTROL_RESERVE = 64 << 10          # most ENC key kept for keepalives alone (see sizing)
MAX_SUBLANES = 4                    # lanes (held key ranges) one OTP worker sends on
MAX_KEY_LAG = 16 << 20              # a datagram may name key this far beyond what is stored

# Global key manager (module 3)
MIN_GLOBAL_BLOCK = 32               # smallest global key block (one 256-bit key)
MAX_GLOBAL_BLOCK = 16 << 20         # largest global key block (key IDs address 24 bits)
MAX_STORE = 64 << 30                # global key one store may be asked to hold
MAX_RELAY_MESSAGE = 16 << 20        # blocks carried by one relay message, in bytes
MAX_RELAY_BLOCKS = 4096             # ... and in number
MAX_PATHS = 4                       # node-disjoint paths (XOR shares) a global key block takes
RELAY_RETRY_S = 2.0                 # first resend of an unacknowledged block (a safety net:
                                    # a new connection resends everything at once)
RELAY_RETRY_MAX_S = 8.0             # backoff cap between resends
MAX_RELAY_FRAME = MAX_GLOBAL_BLOCK + (1 << 16)  # one frame into a relay ROUTER (a block, or
                                    # a RESERVE: at most 131 KiB), with CURVE's overhead
MAX_RELAY_REPLY_FRAME = 1 << 16     # one frame into a relay DEALER (an ACK: at most 37 KiB)
MIN_BLOCKS_AHEAD = 1 << 16          # a received block's number may pass the highest held by
                                    # this many, or 4 windows of blocks if more

# Key API (module 4)
MAX_API_WORKERS = 32                # Sanic worker processes per node
MAX_API_KEY_BYTES = 1 << 20         # largest key one request may ask for (8 Mibit)
MAX_API_REQUEST_BYTES = 64 << 20    # key bytes one answer may carry (number x size)
MAX_API_READ_BYTES = 2 * MAX_API_REQUEST_BYTES  # key blocks one dec_keys may have read
                                    # whole (its keys' and two partial ones beyond them)
MAX_SAE_IDS = 16                    # additional_slave_SAE_IDs one request may name
