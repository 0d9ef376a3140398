"""hotcold.kernels"""
