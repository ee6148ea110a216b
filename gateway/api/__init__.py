"""The Application: middleware, admission (key, limit, permission, scope), the
rules and inputs both answer paths use, and one module per route family.
"""
