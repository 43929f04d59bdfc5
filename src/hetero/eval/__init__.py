"""hetero.eval"""
