"""The one upstream client and what it knows of Cohere: the budget, the guards
(bucket, breaker), answers, and the upstream's protocol facts.
"""
