# cython: language_level=3
"""C++ declarations of csrc/pyllama_bridge.h: our glue over llama.cpp's common library."""

from libcpp.string cimport string


cdef extern from "pyllama_bridge.h" nogil:
    string pyllama_json_schema_to_grammar(const string & schema_json) except +
