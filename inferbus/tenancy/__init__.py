"""A shared bus made from a roster: nats-server accounts, one key per identity, files to hand out.

``inferbus roster apply`` and ``inferbus server --roster`` use it; docs/SECURITY.md explains
the model. The pieces:

- ``settings``: the server's own settings (the roster's ``[server]`` table, then flags)
- ``keys``: nkeys, the seeds (secret) and public keys identities connect with
- ``credentials``: the seed store, one secret key per admin, worker and user
- ``serverconfig``: the nats-server ``accounts`` block (public keys only)
- ``connection_file``: what an identity is handed to connect with
- ``state``: all of it written to a state folder; ``live``: kept in step with the roster
- ``usage``: ``inferbus status --by-user``
"""
