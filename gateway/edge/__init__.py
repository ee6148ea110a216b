"""HTTP/1.1 in and out: the server and its connections, pipelining, rejections
of unparseable requests, and fresh hits answered as soon as their head is
parsed.
"""
