"""The upstream budget's shared tier, as the client sees it: what a take
answers, and the protocol a shared budget keeps.
"""

from __future__ import annotations

# What the budget script says: a token (is) taken, wait for one, or every process is paused.
TOKEN, WAIT, PAUSED_BY_ANOTHER = 0, 1, 2
