/* The SRTP half of media_relay._fastpath (see _srtp.c): what _fastpath.c needs of it.
 *
 * Built with HAVE_SRTP (setup.py found libsrtp2) the module gains SrtpSession, Transcoder,
 * SrtpError and SrtpAuthError; without it these are stubs and HAVE_SRTP is 0 in Python.
 */
#ifndef MEDIA_RELAY_SRTP_H
#define MEDIA_RELAY_SRTP_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Room libsrtp may need after a packet (SRTP_MAX_SRTCP_TRAILER_LEN: index, tag, MKI). */
#define FP_SRTP_TRAILER 148

/* Add the SRTP types, exceptions and HAVE_SRTP / SRTP_VERSION to the module; 0 or -1. */
int fp_srtp_add_to_module(PyObject *module);

/* o is a _fastpath.Transcoder. */
int fp_is_transcoder(PyObject *o);

/* Transcode buf[0:*len] in place (buf has *len + FP_SRTP_TRAILER bytes of room): unprotect with
 * the inbound session, protect with the outbound one. 0 on success, else the libsrtp status (or
 * FP_SRTP_TOO_LONG); a failure of authentication or the replay check is counted in the
 * Transcoder's auth_failures and makes *auth 1. */
#define FP_SRTP_TOO_LONG (-1)
int fp_transcode(PyObject *xcoder, int rtcp, unsigned char *buf, int *len, int *auth);

#endif
