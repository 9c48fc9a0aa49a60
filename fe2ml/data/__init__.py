"""HDF5 strain–stress–tangent logs: schema, writer, reader, fingerprints, sampling campaigns."""
