/* OpenSSL primitives for the system libsrtp2 (built with HAVE_OPENSSL_PRIMITIVES, see setup.py).
 *
 * Debian's libsrtp2 uses NSS for AES and HMAC-SHA1 and creates an NSS context per packet:
 * ~3 us per protect or unprotect of a 172-byte packet. libsrtp's crypto kernel lets an
 * application replace a cipher or auth type by id (srtp_replace_cipher_type/_auth_type, public
 * API in srtp2/cipher.h and auth.h); the kernel runs the replaced type's known-answer tests
 * (libsrtp's own vectors, exported by the library) before it accepts the replacement. These are
 * the same operations as libsrtp's own OpenSSL backend (crypto/cipher/aes_icm_ossl.c,
 * aes_gcm_ossl.c, crypto/hash/hmac_ossl.c of libsrtp 2.5): AES-CTR keyed once per session with
 * the counter set per packet, HMAC-SHA1 from precomputed inner/outer SHA-1 states, AES-GCM
 * through EVP. libsrtp's SRTP logic (key derivation, ROC, replay window) is untouched.
 *
 * If any replacement fails its self-test, fp_ossl_register() returns -1 and whatever was not
 * replaced keeps libsrtp's own implementation (the result is correct either way, only slower).
 */
#define OPENSSL_SUPPRESS_DEPRECATED /* SHA1_Init & co: a plain SHA_CTX copy per packet */

#include <openssl/evp.h>
#include <openssl/sha.h>
#include <srtp2/auth.h>
#include <srtp2/cipher.h>
#include <srtp2/crypto_types.h>
#include <srtp2/srtp.h>
#include <stdlib.h>
#include <string.h>

int fp_ossl_register(void);

#define SALT_LEN 14
#define GCM_IV_LEN 12

/* The library's own known-answer vectors (exported data symbols of libsrtp2.so). */
extern const srtp_cipher_test_case_t srtp_aes_icm_128_test_case_0;
extern const srtp_cipher_test_case_t srtp_aes_icm_256_test_case_0;
extern const srtp_cipher_test_case_t srtp_aes_gcm_128_test_case_0;
extern const srtp_cipher_test_case_t srtp_aes_gcm_256_test_case_0;
extern const srtp_auth_test_case_t srtp_hmac_test_case_0;

static const srtp_cipher_type_t icm_128, icm_256, gcm_128, gcm_256;
static const srtp_auth_type_t hmac_sha1;

/* -- AES-ICM (RFC 3711 §4.1.1): AES-CTR, counter = (salt || 0x0000) XOR IV ------------------- */

/* The keystream is AES-ECB over the packet's counter blocks (the block number in the last 16
 * bits, as RFC 3711 counts them), XORed into the packet: the ECB context is keyed once per
 * session, so a packet costs one EVP_EncryptUpdate. (Setting a CTR context's IV per packet
 * costs OpenSSL 3 a parameter lookup and a re-init each time.) */
#define ICM_MAX_BLOCKS 128 /* 2,048 bytes: more than any datagram the relay carries (1,500) */

typedef struct {
    EVP_CIPHER_CTX *ctx;
    int key_size;
    unsigned char offset[16];
    unsigned char counter[16]; /* the next counter block (icm_set_iv sets the packet's first) */
    unsigned char rest[16];    /* keystream left over from the last block a call began */
    unsigned int nrest;
} Icm;

static srtp_err_status_t icm_alloc(srtp_cipher_t **c, int key_len, int tag_len)
{
    int key_size;
    const srtp_cipher_type_t *type;
    int id;
    if (key_len == 16 + SALT_LEN) {
        key_size = 16, type = &icm_128, id = SRTP_AES_ICM_128;
    } else if (key_len == 32 + SALT_LEN) {
        key_size = 32, type = &icm_256, id = SRTP_AES_ICM_256;
    } else {
        return srtp_err_status_bad_param;
    }
    srtp_cipher_t *cipher = calloc(1, sizeof(*cipher));
    Icm *icm = calloc(1, sizeof(*icm));
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (cipher == NULL || icm == NULL || ctx == NULL) {
        free(cipher);
        free(icm);
        EVP_CIPHER_CTX_free(ctx);
        return srtp_err_status_alloc_fail;
    }
    icm->ctx = ctx;
    icm->key_size = key_size;
    cipher->type = type;
    cipher->state = icm;
    cipher->key_len = key_len;
    cipher->algorithm = id;
    *c = cipher;
    return srtp_err_status_ok;
}

static srtp_err_status_t icm_dealloc(srtp_cipher_t *c)
{
    Icm *icm = c->state;
    if (icm != NULL) {
        EVP_CIPHER_CTX_free(icm->ctx);
        memset(icm, 0, sizeof(*icm));
        free(icm);
    }
    free(c);
    return srtp_err_status_ok;
}

static srtp_err_status_t icm_init(void *state, const uint8_t *key)
{
    Icm *icm = state;
    memset(icm->offset, 0, sizeof(icm->offset));
    memcpy(icm->offset, key + icm->key_size, SALT_LEN); /* the last two octets stay zero */
    memset(icm->counter, 0, sizeof(icm->counter));
    icm->nrest = 0;
    const EVP_CIPHER *evp = icm->key_size == 32 ? EVP_aes_256_ecb() : EVP_aes_128_ecb();
    EVP_CIPHER_CTX_reset(icm->ctx);
    if (!EVP_EncryptInit_ex(icm->ctx, evp, NULL, key, NULL))
        return srtp_err_status_fail;
    EVP_CIPHER_CTX_set_padding(icm->ctx, 0);
    return srtp_err_status_ok;
}

static srtp_err_status_t icm_set_iv(void *state, uint8_t *iv, srtp_cipher_direction_t dir)
{
    (void)dir;
    Icm *icm = state;
    for (int i = 0; i < 16; i++)
        icm->counter[i] = icm->offset[i] ^ iv[i];
    icm->nrest = 0;
    return srtp_err_status_ok;
}

static srtp_err_status_t icm_encrypt(void *state, uint8_t *buf, unsigned int *len)
{
    Icm *icm = state;
    unsigned int n = *len;
    /* A call after one that ended mid-block goes on with that block's keystream, as CTR does. */
    unsigned int used = icm->nrest < n ? icm->nrest : n;
    for (unsigned int i = 0; i < used; i++)
        buf[i] ^= icm->rest[16 - icm->nrest + i];
    icm->nrest -= used;
    buf += used;
    n -= used;
    unsigned int blocks = (n + 15) / 16;
    if (blocks > ICM_MAX_BLOCKS)
        return srtp_err_status_bad_param;
    unsigned char ks[ICM_MAX_BLOCKS * 16];
    /* Counter blocks: the IV's block with its last 16 bits counting up from their start value
     * (libsrtp's own ICM steps only those bits, and a datagram never needs 2^16 blocks). */
    unsigned int start = ((unsigned)icm->counter[14] << 8) | icm->counter[15];
    for (unsigned int b = 0; b < blocks; b++) {
        unsigned char *blk = ks + 16 * b;
        memcpy(blk, icm->counter, 14);
        unsigned int c = (start + b) & 0xFFFF;
        blk[14] = (unsigned char)(c >> 8);
        blk[15] = (unsigned char)c;
    }
    int out = 0;
    if (blocks > 0 && (!EVP_EncryptUpdate(icm->ctx, ks, &out, ks, (int)(blocks * 16)) || out != (int)(blocks * 16)))
        return srtp_err_status_cipher_fail;
    for (unsigned int i = 0; i < n; i++)
        buf[i] ^= ks[i];
    if (n % 16 != 0) {
        icm->nrest = 16 - n % 16;
        memcpy(icm->rest, ks + 16 * blocks - 16, 16);
    }
    unsigned int next = (start + blocks) & 0xFFFF;
    icm->counter[14] = (unsigned char)(next >> 8);
    icm->counter[15] = (unsigned char)next;
    return srtp_err_status_ok;
}

static const srtp_cipher_type_t icm_128 = {
    icm_alloc, icm_dealloc, icm_init, NULL, icm_encrypt, icm_encrypt, icm_set_iv, NULL,
    "AES-128 counter mode (OpenSSL, media_relay)", &srtp_aes_icm_128_test_case_0, SRTP_AES_ICM_128,
};

static const srtp_cipher_type_t icm_256 = {
    icm_alloc, icm_dealloc, icm_init, NULL, icm_encrypt, icm_encrypt, icm_set_iv, NULL,
    "AES-256 counter mode (OpenSSL, media_relay)", &srtp_aes_icm_256_test_case_0, SRTP_AES_ICM_256,
};

/* -- AES-GCM (RFC 7714): libsrtp computes the IV and the AAD; EVP does the rest ---------------- */

typedef struct {
    EVP_CIPHER_CTX *ctx;
    int key_size, tag_len;
    srtp_cipher_direction_t dir;
} Gcm;

static srtp_err_status_t gcm_alloc(srtp_cipher_t **c, int key_len, int tag_len)
{
    int key_size;
    const srtp_cipher_type_t *type;
    int id;
    if (key_len == 16 + GCM_IV_LEN) {
        key_size = 16, type = &gcm_128, id = SRTP_AES_GCM_128;
    } else if (key_len == 32 + GCM_IV_LEN) {
        key_size = 32, type = &gcm_256, id = SRTP_AES_GCM_256;
    } else {
        return srtp_err_status_bad_param;
    }
    if (tag_len != 16 && tag_len != 8)
        return srtp_err_status_bad_param;
    srtp_cipher_t *cipher = calloc(1, sizeof(*cipher));
    Gcm *gcm = calloc(1, sizeof(*gcm));
    EVP_CIPHER_CTX *ctx = EVP_CIPHER_CTX_new();
    if (cipher == NULL || gcm == NULL || ctx == NULL) {
        free(cipher);
        free(gcm);
        EVP_CIPHER_CTX_free(ctx);
        return srtp_err_status_alloc_fail;
    }
    gcm->ctx = ctx;
    gcm->key_size = key_size;
    gcm->tag_len = tag_len;
    gcm->dir = srtp_direction_any;
    cipher->type = type;
    cipher->state = gcm;
    cipher->key_len = key_len;
    cipher->algorithm = id;
    *c = cipher;
    return srtp_err_status_ok;
}

static srtp_err_status_t gcm_dealloc(srtp_cipher_t *c)
{
    Gcm *gcm = c->state;
    if (gcm != NULL) {
        EVP_CIPHER_CTX_free(gcm->ctx);
        memset(gcm, 0, sizeof(*gcm));
        free(gcm);
    }
    free(c);
    return srtp_err_status_ok;
}

static srtp_err_status_t gcm_init(void *state, const uint8_t *key)
{
    Gcm *gcm = state;
    gcm->dir = srtp_direction_any;
    const EVP_CIPHER *evp = gcm->key_size == 32 ? EVP_aes_256_gcm() : EVP_aes_128_gcm();
    EVP_CIPHER_CTX_reset(gcm->ctx);
    if (!EVP_CipherInit_ex(gcm->ctx, evp, NULL, key, NULL, 0))
        return srtp_err_status_init_fail;
    return srtp_err_status_ok;
}

static srtp_err_status_t gcm_set_iv(void *state, uint8_t *iv, srtp_cipher_direction_t dir)
{
    Gcm *gcm = state;
    if (dir != srtp_direction_encrypt && dir != srtp_direction_decrypt)
        return srtp_err_status_bad_param;
    gcm->dir = dir;
    if (!EVP_CIPHER_CTX_ctrl(gcm->ctx, EVP_CTRL_GCM_SET_IVLEN, GCM_IV_LEN, NULL) ||
        !EVP_CipherInit_ex(gcm->ctx, NULL, NULL, NULL, iv, dir == srtp_direction_encrypt))
        return srtp_err_status_init_fail;
    return srtp_err_status_ok;
}

static srtp_err_status_t gcm_set_aad(void *state, const uint8_t *aad, uint32_t aad_len)
{
    Gcm *gcm = state;
    if (gcm->dir != srtp_direction_encrypt && gcm->dir != srtp_direction_decrypt)
        return srtp_err_status_bad_param;
    int out;
    if (!EVP_CipherUpdate(gcm->ctx, NULL, &out, aad, (int)aad_len))
        return srtp_err_status_algo_fail;
    return srtp_err_status_ok;
}

static srtp_err_status_t gcm_encrypt(void *state, uint8_t *buf, unsigned int *len)
{
    Gcm *gcm = state;
    if (gcm->dir != srtp_direction_encrypt && gcm->dir != srtp_direction_decrypt)
        return srtp_err_status_bad_param;
    int out;
    if (*len > 0 && !EVP_CipherUpdate(gcm->ctx, buf, &out, buf, (int)*len))
        return srtp_err_status_cipher_fail;
    return srtp_err_status_ok;
}

static srtp_err_status_t gcm_get_tag(void *state, uint8_t *tag, uint32_t *len)
{
    Gcm *gcm = state;
    int out;
    unsigned char scratch[16];
    if (!EVP_CipherFinal_ex(gcm->ctx, scratch, &out) ||
        !EVP_CIPHER_CTX_ctrl(gcm->ctx, EVP_CTRL_GCM_GET_TAG, gcm->tag_len, tag))
        return srtp_err_status_algo_fail;
    *len = (uint32_t)gcm->tag_len;
    return srtp_err_status_ok;
}

/* buf[0:*len] is ciphertext || tag; on success *len loses the tag. */
static srtp_err_status_t gcm_decrypt(void *state, uint8_t *buf, unsigned int *len)
{
    Gcm *gcm = state;
    if (gcm->dir != srtp_direction_encrypt && gcm->dir != srtp_direction_decrypt)
        return srtp_err_status_bad_param;
    if (*len < (unsigned int)gcm->tag_len)
        return srtp_err_status_auth_fail;
    unsigned int body = *len - (unsigned int)gcm->tag_len;
    int out;
    unsigned char scratch[16];
    if (!EVP_CIPHER_CTX_ctrl(gcm->ctx, EVP_CTRL_GCM_SET_TAG, gcm->tag_len, buf + body))
        return srtp_err_status_auth_fail;
    if (body > 0 && !EVP_CipherUpdate(gcm->ctx, buf, &out, buf, (int)body))
        return srtp_err_status_auth_fail;
    if (EVP_CipherFinal_ex(gcm->ctx, scratch, &out) <= 0)
        return srtp_err_status_auth_fail;
    *len = body;
    return srtp_err_status_ok;
}

static const srtp_cipher_type_t gcm_128 = {
    gcm_alloc, gcm_dealloc, gcm_init, gcm_set_aad, gcm_encrypt, gcm_decrypt, gcm_set_iv, gcm_get_tag,
    "AES-128 GCM (OpenSSL, media_relay)", &srtp_aes_gcm_128_test_case_0, SRTP_AES_GCM_128,
};

static const srtp_cipher_type_t gcm_256 = {
    gcm_alloc, gcm_dealloc, gcm_init, gcm_set_aad, gcm_encrypt, gcm_decrypt, gcm_set_iv, gcm_get_tag,
    "AES-256 GCM (OpenSSL, media_relay)", &srtp_aes_gcm_256_test_case_0, SRTP_AES_GCM_256,
};

/* -- HMAC-SHA1 (RFC 2104), keyed once: inner/outer states precomputed -------------------------- */

typedef struct {
    SHA_CTX inner0, outer0, cur;
} Hmac;

static srtp_err_status_t hmac_alloc(srtp_auth_t **a, int key_len, int out_len)
{
    if (out_len > SHA_DIGEST_LENGTH || out_len < 0 || key_len < 0)
        return srtp_err_status_bad_param;
    srtp_auth_t *auth = calloc(1, sizeof(*auth));
    Hmac *h = calloc(1, sizeof(*h));
    if (auth == NULL || h == NULL) {
        free(auth);
        free(h);
        return srtp_err_status_alloc_fail;
    }
    auth->type = &hmac_sha1;
    auth->state = h;
    auth->out_len = out_len;
    auth->key_len = key_len;
    auth->prefix_len = 0;
    *a = auth;
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_dealloc(srtp_auth_t *a)
{
    if (a->state != NULL) {
        memset(a->state, 0, sizeof(Hmac));
        free(a->state);
    }
    free(a);
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_init(void *state, const uint8_t *key, int key_len)
{
    Hmac *h = state;
    unsigned char block[SHA_CBLOCK], pad[SHA_CBLOCK];
    memset(block, 0, sizeof(block));
    if (key_len > SHA_CBLOCK) {
        SHA1(key, (size_t)key_len, block);
    } else {
        memcpy(block, key, (size_t)key_len);
    }
    for (int i = 0; i < SHA_CBLOCK; i++)
        pad[i] = block[i] ^ 0x36;
    SHA1_Init(&h->inner0);
    SHA1_Update(&h->inner0, pad, SHA_CBLOCK);
    for (int i = 0; i < SHA_CBLOCK; i++)
        pad[i] = block[i] ^ 0x5c;
    SHA1_Init(&h->outer0);
    SHA1_Update(&h->outer0, pad, SHA_CBLOCK);
    h->cur = h->inner0;
    memset(block, 0, sizeof(block));
    memset(pad, 0, sizeof(pad));
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_start(void *state)
{
    Hmac *h = state;
    h->cur = h->inner0;
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_update(void *state, const uint8_t *msg, int len)
{
    Hmac *h = state;
    SHA1_Update(&h->cur, msg, (size_t)len);
    return srtp_err_status_ok;
}

static srtp_err_status_t hmac_compute(void *state, const uint8_t *msg, int len, int tag_len, uint8_t *result)
{
    Hmac *h = state;
    unsigned char inner[SHA_DIGEST_LENGTH], tag[SHA_DIGEST_LENGTH];
    if (tag_len > SHA_DIGEST_LENGTH || tag_len < 0)
        return srtp_err_status_bad_param;
    SHA1_Update(&h->cur, msg, (size_t)len);
    SHA1_Final(inner, &h->cur);
    SHA_CTX outer = h->outer0;
    SHA1_Update(&outer, inner, sizeof(inner));
    SHA1_Final(tag, &outer);
    memcpy(result, tag, (size_t)tag_len);
    return srtp_err_status_ok;
}

static const srtp_auth_type_t hmac_sha1 = {
    hmac_alloc, hmac_dealloc, hmac_init, hmac_compute, hmac_update, hmac_start,
    "HMAC-SHA1 (OpenSSL, media_relay)", &srtp_hmac_test_case_0, SRTP_HMAC_SHA1,
};

/* After srtp_init(): 0 when every replacement passed libsrtp's self-tests. */
int fp_ossl_register(void)
{
    int rc = 0;
    if (srtp_replace_cipher_type(&icm_128, SRTP_AES_ICM_128) != srtp_err_status_ok)
        rc = -1;
    if (srtp_replace_cipher_type(&icm_256, SRTP_AES_ICM_256) != srtp_err_status_ok)
        rc = -1;
    if (srtp_replace_cipher_type(&gcm_128, SRTP_AES_GCM_128) != srtp_err_status_ok)
        rc = -1;
    if (srtp_replace_cipher_type(&gcm_256, SRTP_AES_GCM_256) != srtp_err_status_ok)
        rc = -1;
    if (srtp_replace_auth_type(&hmac_sha1, SRTP_HMAC_SHA1) != srtp_err_status_ok)
        rc = -1;
    return rc;
}
