"""hetero.dist"""
