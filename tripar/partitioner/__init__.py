"""tripar.partitioner"""
