"""hetero.hardware"""
