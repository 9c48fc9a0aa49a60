"""Macroscale problem: dolfinx mesh on the caller's communicator, quadrature-point constitutive laws."""
