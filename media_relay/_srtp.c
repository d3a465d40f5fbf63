/* SRTP for C's native transcoding path (spec §7): libsrtp2 sessions shared by Python and C.
 *
 * SrtpSession(profile, key_salt, outbound) is one direction of one SDES key (any SSRC), the
 * native twin of a pylibsrtp Session: same policy (libsrtp's profile defaults, replay window
 * 128, no repeated transmissions), same per-call length limits (pylibsrtp's 1500-byte buffer:
 * protect <= 1356 bytes, protect_rtcp <= 1352, unprotect <= 1500), same libsrtp status codes.
 * Transcoder(inbound, outbound) is C's per-ingress-leg B2BUA step (unprotect, then protect;
 * either side may be None for plain RTP); it counts SRTP authentication/replay failures itself.
 *
 * media_relay.srtp.SrtpContext wraps an SrtpSession whenever this module has one, so the
 * packets Python transcodes (a leg's first packet, C's pinhole packets) and the packets the
 * Forwarder transcodes for an installed flow go through *the same* libsrtp session: one ROC and
 * one replay window per SSRC, whichever path a packet takes. Nothing is copied between paths.
 *
 * pylibsrtp links its own static libsrtp (and OpenSSL) into its extension; Python loads
 * extensions RTLD_LOCAL, so its srtp_* symbols and ours (the system libsrtp2.so.1) do not
 * interpose, and each copy has its own crypto kernel (srtp_init runs once per copy).
 * tests/media/test_media_srtp_native.py checks both in one process.
 */
#include "_srtp.h"

#ifdef HAVE_SRTP

#include <pthread.h>
#include <srtp2/srtp.h>
#include <string.h>

#include "structmember.h"

#define PY_BUF 1500 /* pylibsrtp.Session's buffer: the same limits, the same errors */
#define SRTP_TRAILER 144  /* pylibsrtp SRTP_MAX_TRAILER_LEN */

enum { OP_PROTECT, OP_PROTECT_RTCP, OP_UNPROTECT, OP_UNPROTECT_RTCP };
static const int op_max_len[] = {PY_BUF - SRTP_TRAILER, PY_BUF - FP_SRTP_TRAILER, PY_BUF, PY_BUF};

/* libsrtp's srtp_err_status_t texts, as pylibsrtp words them. */
static const char *const status_text[] = {
    "nothing to report", "unspecified failure", "unsupported parameter", "couldn't allocate memory",
    "couldn't deallocate properly", "couldn't initialize", "can't process as much data as requested",
    "authentication failure", "cipher failure", "replay check failed (bad index)",
    "replay check failed (index too old)", "algorithm failed test routine", "unsupported operation",
    "no appropriate context found", "unable to perform desired validation", "can't use key any more",
    "error in use of socket", "error in use POSIX signals", "nonce check failed", "couldn't read data",
    "couldn't write data", "error parsing data", "error encoding data", "error while using semaphores",
    "error while using pfkey", "error MKI present in packet is invalid", "packet index is too old to consider",
    "packet index advanced, reset needed",
};

static PyObject *SrtpError;     /* media_relay._fastpath.SrtpError(message, status) */
static PyObject *SrtpAuthError; /* subclass: authentication or replay check failed */

/* What media_relay.srtp counts as an authentication failure (pylibsrtp: "authentication",
 * "replay" or "index" in the message). */
static inline int is_auth_status(int st)
{
    return st == srtp_err_status_auth_fail || st == srtp_err_status_replay_fail ||
           st == srtp_err_status_replay_old || st == srtp_err_status_pkt_idx_old ||
           st == srtp_err_status_pkt_idx_adv;
}

static PyObject *raise_status(int st)
{
    const char *text = st == FP_SRTP_TOO_LONG ? "packet is too long"
                       : (st >= 0 && (size_t)st < sizeof(status_text) / sizeof(status_text[0]))
                           ? status_text[st]
                           : "unknown libsrtp status";
    PyObject *args = Py_BuildValue("(si)", text, st);
    if (args != NULL) {
        PyErr_SetObject(is_auth_status(st) ? SrtpAuthError : SrtpError, args);
        Py_DECREF(args);
    }
    return NULL;
}

/* -- SrtpSession ------------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    srtp_t ctx;
    int profile;
    int outbound;
    /* One session may be used by Python (a leg's first packets, with the GIL) and by a
     * forwarder thread serving its flows (without it) at the same time. */
    pthread_mutex_t mu;
} SrtpSession;

static PyTypeObject SrtpSessionType;

static inline int session_apply(SrtpSession *s, int op, unsigned char *buf, int *len)
{
    if (*len > op_max_len[op])
        return FP_SRTP_TOO_LONG;
    int st;
    pthread_mutex_lock(&s->mu);
    switch (op) {
    case OP_PROTECT:
        st = (int)srtp_protect(s->ctx, buf, len);
        break;
    case OP_PROTECT_RTCP:
        st = (int)srtp_protect_rtcp(s->ctx, buf, len);
        break;
    case OP_UNPROTECT:
        st = (int)srtp_unprotect(s->ctx, buf, len);
        break;
    default:
        st = (int)srtp_unprotect_rtcp(s->ctx, buf, len);
        break;
    }
    pthread_mutex_unlock(&s->mu);
    return st;
}

static int SrtpSession_init(SrtpSession *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"profile", "key_salt", "outbound", NULL};
    int profile, outbound;
    Py_buffer key;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iy*p", kwlist, &profile, &key, &outbound))
        return -1;
    int rc = -1;
    if (self->ctx != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "SrtpSession already initialised");
        goto done;
    }
    srtp_policy_t policy;
    memset(&policy, 0, sizeof(policy));
    if (srtp_crypto_policy_set_from_profile_for_rtp(&policy.rtp, (srtp_profile_t)profile) != srtp_err_status_ok ||
        srtp_crypto_policy_set_from_profile_for_rtcp(&policy.rtcp, (srtp_profile_t)profile) != srtp_err_status_ok) {
        PyErr_Format(PyExc_ValueError, "SRTP profile %d is not supported by libsrtp", profile);
        goto done;
    }
    Py_ssize_t want = (Py_ssize_t)(srtp_profile_get_master_key_length((srtp_profile_t)profile) +
                                   srtp_profile_get_master_salt_length((srtp_profile_t)profile));
    if (key.len != want) {
        PyErr_Format(PyExc_ValueError, "SRTP profile %d needs %zd key||salt bytes, got %zd", profile, want,
                     key.len);
        goto done;
    }
    unsigned char material[64];
    memcpy(material, key.buf, (size_t)key.len);
    policy.key = material;
    policy.ssrc.type = outbound ? ssrc_any_outbound : ssrc_any_inbound;
    srtp_err_status_t st = srtp_create(&self->ctx, &policy);
    memset(material, 0, sizeof(material));
    if (st != srtp_err_status_ok) {
        self->ctx = NULL;
        raise_status((int)st);
        goto done;
    }
    self->profile = profile;
    self->outbound = outbound;
    rc = 0;
done:
    PyBuffer_Release(&key);
    return rc;
}

static PyObject *SrtpSession_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    SrtpSession *self = (SrtpSession *)type->tp_alloc(type, 0);
    if (self != NULL)
        pthread_mutex_init(&self->mu, NULL);
    return (PyObject *)self;
}

static void SrtpSession_dealloc(SrtpSession *self)
{
    if (self->ctx != NULL)
        srtp_dealloc(self->ctx);
    pthread_mutex_destroy(&self->mu);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *session_call(SrtpSession *self, PyObject *arg, int op)
{
    if (self->ctx == NULL) {
        PyErr_SetString(PyExc_ValueError, "SrtpSession is not initialised");
        return NULL;
    }
    if (!PyBytes_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "packet must be bytes");
        return NULL;
    }
    Py_ssize_t n = PyBytes_GET_SIZE(arg);
    unsigned char buf[PY_BUF + FP_SRTP_TRAILER];
    if (n > PY_BUF)
        return raise_status(FP_SRTP_TOO_LONG);
    int len = (int)n;
    memcpy(buf, PyBytes_AS_STRING(arg), (size_t)n);
    int st = session_apply(self, op, buf, &len);
    if (st != 0)
        return raise_status(st);
    return PyBytes_FromStringAndSize((const char *)buf, len);
}

static PyObject *SrtpSession_protect(SrtpSession *self, PyObject *arg)
{
    return session_call(self, arg, OP_PROTECT);
}

static PyObject *SrtpSession_protect_rtcp(SrtpSession *self, PyObject *arg)
{
    return session_call(self, arg, OP_PROTECT_RTCP);
}

static PyObject *SrtpSession_unprotect(SrtpSession *self, PyObject *arg)
{
    return session_call(self, arg, OP_UNPROTECT);
}

static PyObject *SrtpSession_unprotect_rtcp(SrtpSession *self, PyObject *arg)
{
    return session_call(self, arg, OP_UNPROTECT_RTCP);
}

/* roc(ssrc) -> int | None: libsrtp's rollover counter for an SSRC it has a stream for (a
 * packet of it has been through this session), else None. For C's kernel SRTP flows, which
 * carry the index on from where libsrtp left it. */
static PyObject *SrtpSession_roc(SrtpSession *self, PyObject *arg)
{
    unsigned long ssrc = PyLong_AsUnsignedLong(arg);
    if (PyErr_Occurred())
        return NULL;
    if (self->ctx == NULL || ssrc > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError, "roc(ssrc): an initialised session and a 32-bit SSRC");
        return NULL;
    }
    uint32_t roc = 0;
    pthread_mutex_lock(&self->mu);
    int st = (int)srtp_get_stream_roc(self->ctx, (uint32_t)ssrc, &roc);
    pthread_mutex_unlock(&self->mu);
    if (st != 0)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(roc);
}

/* set_roc(ssrc, roc) -> bool: move the SSRC's rollover counter forward (where a kernel flow
 * has taken it); False if libsrtp has no stream for the SSRC or the ROC would go backwards. */
static PyObject *SrtpSession_set_roc(SrtpSession *self, PyObject *args)
{
    unsigned long ssrc, roc;
    if (!PyArg_ParseTuple(args, "kk", &ssrc, &roc))
        return NULL;
    if (self->ctx == NULL || ssrc > 0xFFFFFFFFUL || roc > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_ValueError, "set_roc(ssrc, roc): an initialised session, 32-bit values");
        return NULL;
    }
    pthread_mutex_lock(&self->mu);
    int st = (int)srtp_set_stream_roc(self->ctx, (uint32_t)ssrc, (uint32_t)roc);
    pthread_mutex_unlock(&self->mu);
    return PyBool_FromLong(st == 0);
}

static PyMethodDef SrtpSession_methods[] = {
    {"protect", (PyCFunction)SrtpSession_protect, METH_O, "protect(rtp) -> srtp"},
    {"protect_rtcp", (PyCFunction)SrtpSession_protect_rtcp, METH_O, "protect_rtcp(rtcp) -> srtcp"},
    {"unprotect", (PyCFunction)SrtpSession_unprotect, METH_O, "unprotect(srtp) -> rtp"},
    {"unprotect_rtcp", (PyCFunction)SrtpSession_unprotect_rtcp, METH_O, "unprotect_rtcp(srtcp) -> rtcp"},
    {"roc", (PyCFunction)SrtpSession_roc, METH_O, "roc(ssrc) -> the SSRC's rollover counter, or None"},
    {"set_roc", (PyCFunction)SrtpSession_set_roc, METH_VARARGS, "set_roc(ssrc, roc) -> set (bool)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef SrtpSession_members[] = {
    {"profile", T_INT, offsetof(SrtpSession, profile), READONLY, "libsrtp srtp_profile_t"},
    {"outbound", T_BOOL, offsetof(SrtpSession, outbound), READONLY, "protects (else unprotects)"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SrtpSessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "media_relay._fastpath.SrtpSession",
    .tp_doc = PyDoc_STR("SrtpSession(profile, key_salt, outbound): one libsrtp session, any SSRC."),
    .tp_basicsize = sizeof(SrtpSession),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = SrtpSession_new,
    .tp_init = (initproc)SrtpSession_init,
    .tp_dealloc = (destructor)SrtpSession_dealloc,
    .tp_methods = SrtpSession_methods,
    .tp_members = SrtpSession_members,
};

/* -- Transcoder ------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *inbound;  /* SrtpSession or NULL (plain RTP in) */
    PyObject *outbound; /* SrtpSession or NULL (plain RTP out) */
    long long auth_failures;
} Transcoder;

static PyTypeObject TranscoderType;

int fp_is_transcoder(PyObject *o)
{
    return o != NULL && Py_IS_TYPE(o, &TranscoderType);
}

int fp_transcode(PyObject *xcoder, int rtcp, unsigned char *buf, int *len, int *auth)
{
    Transcoder *t = (Transcoder *)xcoder;
    int st = 0;
    *auth = 0;
    if (t->inbound != NULL)
        st = session_apply((SrtpSession *)t->inbound, rtcp ? OP_UNPROTECT_RTCP : OP_UNPROTECT, buf, len);
    if (st == 0 && t->outbound != NULL)
        st = session_apply((SrtpSession *)t->outbound, rtcp ? OP_PROTECT_RTCP : OP_PROTECT, buf, len);
    if (st != 0 && is_auth_status(st)) {
        __atomic_fetch_add(&t->auth_failures, 1, __ATOMIC_RELAXED); /* a forwarder thread and Python */
        *auth = 1;
    }
    return st;
}

static int check_session(PyObject *o, int outbound, const char *what)
{
    if (o == Py_None)
        return 0;
    if (!Py_IS_TYPE(o, &SrtpSessionType) || ((SrtpSession *)o)->ctx == NULL) {
        PyErr_Format(PyExc_TypeError, "%s must be an SrtpSession or None", what);
        return -1;
    }
    if (((SrtpSession *)o)->outbound != outbound) {
        PyErr_Format(PyExc_ValueError, "%s session has the wrong direction", what);
        return -1;
    }
    return 0;
}

static int Transcoder_init(Transcoder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"inbound", "outbound", NULL};
    PyObject *in, *out;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OO", kwlist, &in, &out))
        return -1;
    if (check_session(in, 0, "inbound") < 0 || check_session(out, 1, "outbound") < 0)
        return -1;
    Py_CLEAR(self->inbound);
    Py_CLEAR(self->outbound);
    self->inbound = in == Py_None ? NULL : Py_NewRef(in);
    self->outbound = out == Py_None ? NULL : Py_NewRef(out);
    return 0;
}

static void Transcoder_dealloc(Transcoder *self)
{
    Py_CLEAR(self->inbound);
    Py_CLEAR(self->outbound);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Transcoder_transcode(Transcoder *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"data", "rtcp", NULL};
    PyObject *data;
    int rtcp;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "Sp", kwlist, &data, &rtcp))
        return NULL;
    Py_ssize_t n = PyBytes_GET_SIZE(data);
    if (n > PY_BUF)
        return raise_status(FP_SRTP_TOO_LONG);
    unsigned char buf[PY_BUF + FP_SRTP_TRAILER];
    int len = (int)n, auth;
    memcpy(buf, PyBytes_AS_STRING(data), (size_t)n);
    int st = fp_transcode((PyObject *)self, rtcp, buf, &len, &auth);
    if (st != 0)
        return raise_status(st);
    if (self->inbound == NULL && self->outbound == NULL)
        return Py_NewRef(data);
    return PyBytes_FromStringAndSize((const char *)buf, len);
}

static PyObject *Transcoder_get_inbound(Transcoder *self, void *closure)
{
    return Py_NewRef(self->inbound ? self->inbound : Py_None);
}

static PyObject *Transcoder_get_outbound(Transcoder *self, void *closure)
{
    return Py_NewRef(self->outbound ? self->outbound : Py_None);
}

static PyGetSetDef Transcoder_getset[] = {
    {"inbound", (getter)Transcoder_get_inbound, NULL, "SrtpSession or None", NULL},
    {"outbound", (getter)Transcoder_get_outbound, NULL, "SrtpSession or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef Transcoder_members[] = {
    {"auth_failures", T_LONGLONG, offsetof(Transcoder, auth_failures), READONLY,
     "packets refused by SRTP authentication or the replay check (Python and native paths)"},
    {NULL, 0, 0, 0, NULL},
};

static PyMethodDef Transcoder_methods[] = {
    {"transcode", (PyCFunction)(void (*)(void))Transcoder_transcode, METH_VARARGS | METH_KEYWORDS,
     "transcode(data, rtcp) -> bytes; raises SrtpError / SrtpAuthError"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TranscoderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "media_relay._fastpath.Transcoder",
    .tp_doc = PyDoc_STR("Transcoder(inbound, outbound): unprotect, then protect (None: plain)."),
    .tp_basicsize = sizeof(Transcoder),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Transcoder_init,
    .tp_dealloc = (destructor)Transcoder_dealloc,
    .tp_methods = Transcoder_methods,
    .tp_members = Transcoder_members,
    .tp_getset = Transcoder_getset,
};

/* -- module ----------------------------------------------------------------------------------- */

#ifdef HAVE_OPENSSL_PRIMITIVES
int fp_ossl_register(void); /* _srtp_ossl.c */
#endif

int fp_srtp_add_to_module(PyObject *m)
{
    srtp_err_status_t st = srtp_init();
    if (st != srtp_err_status_ok) { /* no usable libsrtp: the module still relays plain flows */
        return PyModule_AddIntConstant(m, "HAVE_SRTP", 0);
    }
    const char *primitives = "libsrtp";
#ifdef HAVE_OPENSSL_PRIMITIVES
    if (fp_ossl_register() == 0)
        primitives = "openssl";
#endif
    if (PyType_Ready(&SrtpSessionType) < 0 || PyType_Ready(&TranscoderType) < 0)
        return -1;
    SrtpError = PyErr_NewException("media_relay._fastpath.SrtpError", PyExc_Exception, NULL);
    if (SrtpError == NULL)
        return -1;
    SrtpAuthError = PyErr_NewException("media_relay._fastpath.SrtpAuthError", SrtpError, NULL);
    if (SrtpAuthError == NULL)
        return -1;
    if (PyModule_AddObjectRef(m, "SrtpSession", (PyObject *)&SrtpSessionType) < 0 ||
        PyModule_AddObjectRef(m, "Transcoder", (PyObject *)&TranscoderType) < 0 ||
        PyModule_AddObjectRef(m, "SrtpError", SrtpError) < 0 ||
        PyModule_AddObjectRef(m, "SrtpAuthError", SrtpAuthError) < 0 ||
        PyModule_AddStringConstant(m, "SRTP_VERSION", srtp_get_version_string()) < 0 ||
        PyModule_AddStringConstant(m, "SRTP_PRIMITIVES", primitives) < 0)
        return -1;
    return PyModule_AddIntConstant(m, "HAVE_SRTP", 1);
}

#else /* !HAVE_SRTP: plain relaying only */

int fp_srtp_add_to_module(PyObject *m)
{
    return PyModule_AddIntConstant(m, "HAVE_SRTP", 0);
}

int fp_is_transcoder(PyObject *o)
{
    return 0;
}

int fp_transcode(PyObject *xcoder, int rtcp, unsigned char *buf, int *len, int *auth)
{
    *auth = 0;
    return FP_SRTP_TOO_LONG; /* unreachable: no Transcoder can exist */
}

#endif
