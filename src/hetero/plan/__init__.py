"""hetero.plan"""
