# The C types of the compiled online calibrator: costmodel/linear.py compiled by Cython as
# `vllm_shadow.costmodel._linear_compiled` (see setup.py), as solver/simulator.py is. The .py stays the one source
# of the algorithm and the oracle (VLLM_SHADOW_PURE_PYTHON=1); this file only declares types for it (Cython's
# "augmenting .pxd"): the calibrator becomes an extension type whose state is C doubles, and a refit runs on them.
# Only `OnlineCalibrator` is handed out (the end of linear.py). A declaration that does not match the .py fails
# the build.
#
# C doubles are Python's floats: the same IEEE operations in the same order, which setup.py keeps from being
# contracted into fused multiply-adds (-ffp-contract=off). Where C would differ, the .py keeps Python objects: the
# step's features and measured time come in as objects (float() of an int as Python rounds it; the weight is
# Python's float power), and sums are Python's sum().

cimport cython
# The .py's `libm` (Python's math module there) is C's: an update's isfinite() of the measured time and square
# roots of positive doubles, the same results as Python's (correctly rounded) without a Python call.
cimport libc.math as libm


cdef class OnlineCalibrator:
    cdef double[15] _prior_information
    cdef double[5] _prior_moment
    cdef double _forgetting
    cdef double[15] _information
    cdef double[5] _moment
    cdef double _effective_samples
    cdef double[5] _coefficients
    cdef tuple _positive_coefficients
    cdef double _error_sum
    cdef Py_ssize_t _samples
    cdef double[5] _scale
    cdef double[15] _system
    cdef double[5] _rhs
    cdef double[5] _hint_scale
    cdef double[15] _hint_system
    cdef double[5] _hint_rhs
    cdef Py_ssize_t[5] _passive
    cdef double[15] _factor
    cdef double[5] _forward
    cdef double[5] _solution

    @cython.locals(
        y=double, x=double[5], c=cython.p_double, predicted=double, lam=double, weight=double,
        information=cython.p_double, moment=cython.p_double, weighted_time=double, i=Py_ssize_t,
        j=Py_ssize_t, row=Py_ssize_t,
    )
    cpdef update_features(self, tokens, kv_tokens, attention_units, requests, measured_seconds)

    @cython.locals(
        system=cython.p_double, rhs=cython.p_double, scale=cython.p_double, information=cython.p_double,
        prior_information=cython.p_double, coefficients=cython.p_double, solution=cython.p_double,
        smallest=double, k=Py_ssize_t, i=Py_ssize_t, j=Py_ssize_t, row=Py_ssize_t, positive=tuple,
    )
    cdef _solve(self)

    @cython.locals(
        m=cython.p_double, r=cython.p_double, s=cython.p_double, a=cython.p_double, b=cython.p_double,
        passive=cython.p_Py_ssize_t, positive=tuple, count=Py_ssize_t, diagonal=double, z=cython.p_double,
        coefficients=cython.p_double, scale=cython.p_double, terms=list, p=Py_ssize_t, q=Py_ssize_t,
        i=Py_ssize_t, j=Py_ssize_t, row=Py_ssize_t,
    )
    cdef bint _solve_on_hint(self) except -1

    @cython.locals(
        passive=cython.p_Py_ssize_t, factor=cython.p_double, forward=cython.p_double, z=cython.p_double,
        total=double, pivot=double, i=Py_ssize_t, j=Py_ssize_t, q=Py_ssize_t, row=Py_ssize_t,
        system_row=Py_ssize_t, column=Py_ssize_t,
    )
    cdef _solve_on(self, double* m, double* r, Py_ssize_t count)


cdef Py_ssize_t _packed(Py_ssize_t i, Py_ssize_t j) noexcept

cdef Py_ssize_t _SIZE
cdef Py_ssize_t _PACKED_SIZE
cdef double _TOLERANCE
