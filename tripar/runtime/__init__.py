"""tripar.runtime"""
