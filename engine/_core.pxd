# cython: language_level=3
# Data layout of the compiled core; the behaviour is in _core.pyx.
#
# Fields that hold names are typed ``object`` rather than ``str``: Cython checks ``str``
# exactly, and str subclasses (engine.states.state, enum-like names) must be accepted.

cdef struct _Reader:
    const unsigned char* buf
    Py_ssize_t pos
    Py_ssize_t end


cdef class TaskMessage:
    cdef object _id
    cdef object _task
    cdef tuple _args          # None while the payload has not been unpacked
    cdef dict _kwargs         # None while the payload has not been unpacked
    cdef bytes _payload       # None when it must be (re)packed from _args/_kwargs
    cdef object _retries      # int >= 0 (a Python int: may exceed 64 bits until encoded)
    cdef object _eta          # float or None
    cdef object _expires      # float or None
    cdef object _queue
    cdef object _reply_to
    cdef object _parent_id
    cdef object _root_id
    cdef bint _ignore_result
    cdef dict _options

    cdef int _decode(self) except -1
    cdef bytes _get_payload(self)


cdef class TaskRegistry:
    cdef dict _tasks

    cpdef object lookup(self, object name)


cdef class StateRecord:
    cdef readonly object task_id
    cdef readonly object state
    cdef readonly object result
    cdef readonly object traceback
    cdef readonly double timestamp


cdef class StateRecorder:
    cdef readonly Py_ssize_t batch_size
    cdef readonly Py_ssize_t max_entries
    cdef dict _table          # task id -> StateRecord
    cdef dict _pending        # ids changed since the last flush, first-change order
    cdef object _clean        # OrderedDict: flushed ids, least recently flushed first

    cpdef bint record(self, object task_id, object state, object result=*,
                      object traceback=*, object timestamp=*) except -1
    cdef int _evict(self) except -1
