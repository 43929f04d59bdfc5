"""hetero.runtime"""
