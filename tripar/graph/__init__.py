"""tripar.graph"""
