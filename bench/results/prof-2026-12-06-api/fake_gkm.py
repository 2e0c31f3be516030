"""A stand-in global key manager that answers every take at once from os.urandom: with
it, a key API worker's own CPU per request is measured alone (worker_alone.py)."""
import os
import sys
import uuid

import zmq

from control.gkm import take

ctx = zmq.Context()
sock = ctx.socket(zmq.ROUTER)
sock.bind(f"ipc://{sys.argv[1]}")
while True:
    frames = sock.recv_multipart()
    envelope, body = frames[:-1], frames[-1]
    req = take.parse_request(body, 0.0, {"B"}) if b"take_enc" in body else None
    if req is not None:
        head = {"key_ids": [str(uuid.uuid4()) for _ in range(req.number)]}
        data = os.urandom(req.number * req.size)
    else:
        head, data = {"usable": 1 << 30, "high_watermark": 1 << 30,
                      "block_size": 1 << 20}, None
    sock.send_multipart([*envelope, *take.encode_answer(head, data)])
