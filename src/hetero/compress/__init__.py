"""hetero.compress"""
