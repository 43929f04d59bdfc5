"""hetero.model"""
