"""Worker processes of a node with ``[node] workers`` >= 2 (issue 13).

``channel``: the framed messages between the supervisor and one worker (and the listening
sockets passed with them); ``worker``: the worker process (``python -m lbnode.workers.worker``);
``counters``: a worker's counters as a document, and the supervisor's sum of them. The
supervisor itself is ``lbnode.supervisor``.
"""
