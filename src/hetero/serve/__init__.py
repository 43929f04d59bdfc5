"""hetero.serve"""
