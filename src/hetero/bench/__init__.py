"""hetero.bench"""
