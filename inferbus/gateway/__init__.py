"""The HTTP front door: KServe V2 REST (with Triton's binary tensor extension) onto the bus.

``inferbus gateway`` serves it (serve.py); app.py is the ASGI application, framing.py the pure
translation of bodies and replies, identities.py whose NATS identity a request travels under,
replies.py the error mapping. docs/GATEWAY.md describes it. Nothing outside this package
imports it: ``import inferbus`` never loads the HTTP stack.
"""
