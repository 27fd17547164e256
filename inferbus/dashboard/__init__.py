"""The cluster dashboard the gateway serves at ``/``: a page with nothing to build (page.py)
fed once a second by server-sent events made from the workers' ``$SRV`` replies (feed.py)."""
