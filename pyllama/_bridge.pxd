# cython: language_level=3
"""C++ declarations of csrc/pyllama_bridge.h: our glue over llama.cpp's common library."""

from libcpp.string cimport string

from pyllama._llama cimport llama_model


cdef extern from "pyllama_bridge.h" nogil:
    string pyllama_json_schema_to_grammar(const string & schema_json) except +


cdef extern from "pyllama_bridge.h" nogil:
    struct pyllama_chat
    pyllama_chat * pyllama_chat_init(const llama_model * model, const string & template_override) except +
    void pyllama_chat_free(pyllama_chat * chat)
    string pyllama_chat_info(const pyllama_chat * chat) except +
    string pyllama_chat_apply(const pyllama_chat * chat, const string & inputs_json) except +
    string pyllama_chat_parse(const string & text, bint is_partial, const string & params_json) except +
