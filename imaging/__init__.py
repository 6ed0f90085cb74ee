"""The image policy that training and the service share (imaging/policy.py)."""
