"""tripar.models"""
