"""tripar.plan"""
