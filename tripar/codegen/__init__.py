"""tripar.codegen"""
