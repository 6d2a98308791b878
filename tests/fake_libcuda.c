/* A fake CUDA driver (libcuda.so.1) for the green-context recipe, so the real cuda-bindings runs the project's call
 * sequence on a machine without a GPU (tests/fake_cuda.py builds it and puts it on LD_LIBRARY_PATH).
 *
 * It exports the driver's C symbols under the names cuda-bindings looks up with dlsym when the library has no
 * cuGetProcAddress (cuStreamDestroy_v2, cuDevicePrimaryCtxRelease_v2, ...); a call it lacks raises
 * RuntimeError('Function "..." not found') in the binding, as a real driver too old for it would.
 *
 * It checks the sequence as the real driver would answer it, and records what a real driver would not say:
 *   - every call but cuInit, cuDriverGetVersion and cuGetErrorName/String needs cuInit first (NOT_INITIALIZED);
 *   - calls on "the current context" need one bound to the calling thread (INVALID_CONTEXT otherwise);
 *   - cuDevSmResourceSplitByCount rounds the groups up to 8 SMs (2 with IGNORE_SM_COSCHEDULING) and returns the rest
 *     as the remainder, on a device of FAKE_CUDA_SMS SMs (default 132, an H200); each resource knows which SMs it
 *     holds (groups in order, then the remainder) and the split that made it, in its internal padding;
 *   - cuDevResourceGenerateDesc over several SM resources needs them to come from one split and to have the same
 *     smCoscheduledAlignment (INVALID_RESOURCE_CONFIGURATION otherwise, as documented); FAKE_CUDA_REMAINDER_ALIGNMENT
 *     gives remainders another alignment than their groups, to see a driver refuse a group plus its remainder;
 *     green contexts report the SMs they hold ("green 1: 44 SMs 0-7,96-131");
 *   - green contexts need CU_GREEN_CTX_DEFAULT_STREAM, their streams CU_STREAM_NON_BLOCKING; each green context
 *     holds a reference to the primary context, as cuGreenCtxCreate documents;
 *   - destroying a green context that still has streams, destroying anything twice, releasing the primary context
 *     more often than it was retained, or passing a handle it never made are recorded as violations.
 * FAKE_CUDA_FAIL=name:n makes the n-th call of `name` fail with CUDA_ERROR_OUT_OF_MEMORY, FAKE_CUDA_FAIL=name every one.
 * fake_cuda_report() writes the calls (names, in order), events (what they made or destroyed), live objects, the
 * stream handles it gave out and the violations as JSON.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <stdarg.h>

typedef int CUresult;
typedef int CUdevice;
enum {
    SUCCESS = 0, INVALID_VALUE = 1, OUT_OF_MEMORY = 2, NOT_INITIALIZED = 3, INVALID_DEVICE = 101,
    INVALID_CONTEXT = 201, INVALID_HANDLE = 400, INVALID_RESOURCE_TYPE = 914, INVALID_RESOURCE_CONFIGURATION = 915,
};
enum { RESOURCE_TYPE_SM = 1, SPLIT_IGNORE_SM_COSCHEDULING = 1, GREEN_CTX_DEFAULT_STREAM = 1, STREAM_NON_BLOCKING = 1 };
enum { LEAST_PRIORITY = 0, GREATEST_PRIORITY = -5, MAX_OBJECTS = 256 };

typedef struct { unsigned smCount, minSmPartitionSize, smCoscheduledAlignment, flags; } SmResource;
/* CUdevResource of cuda.h (13.x): the SM fields sit at byte 96, inside a 40-byte union, then a next pointer. */
typedef struct CUdevResource_st {
    int type;
    unsigned char internal_padding[92];
    union { SmResource sm; unsigned char oversize[40]; };
    struct CUdevResource_st *nextResource;
} CUdevResource;
_Static_assert(sizeof(CUdevResource) == 144, "CUdevResource layout");

/* What this fake keeps in a resource's internal padding: the split that made it (0: the device's) and its first SM. */
typedef struct { int split; unsigned first_sm; } Origin;
_Static_assert(sizeof(Origin) <= 92, "Origin fits the padding");

enum { MAX_SMS = 256 };
typedef struct {
    int id; int kind; int alive; unsigned sms; int owner; unsigned flags; int priority;
    unsigned char held[MAX_SMS];  /* descriptors and green contexts: which SMs */
} Object;
enum { PRIMARY = 1, DESC = 2, GREEN = 3, STREAM = 4 };

static int initialized, total_sms = 132, primary_refs, primary_retains, num_objects, splits_made, remainder_alignment;
static Object objects[MAX_OBJECTS];
static Object primary = {0, PRIMARY, 1, 0, -1, 0, 0, {0}};
static __thread Object *current;
static char calls[65536], events[65536], violations[16384], fail_name[128];
static int fail_at, fail_count;

/* Append one JSON string to a comma-separated list (messages hold no quotes); a full buffer drops the message. */
static void append(char *buf, size_t size, const char *fmt, ...) {
    size_t at = strlen(buf);
    va_list args;
    if (at + 8 >= size) return;
    strcat(buf, at ? ",\"" : "\"");
    at = strlen(buf);
    va_start(args, fmt);
    vsnprintf(buf + at, size - at - 2, fmt, args);
    va_end(args);
    strcat(buf, "\"");
}
#define CALL(...) append(calls, sizeof calls, __VA_ARGS__)
#define EVENT(...) append(events, sizeof events, __VA_ARGS__)
#define VIOLATION(...) append(violations, sizeof violations, __VA_ARGS__)

static int injected_failure(const char *name) {
    return fail_at && strcmp(name, fail_name) == 0 && (++fail_count == fail_at || fail_at < 0);
}

#define ENTER(name) do { CALL("%s", name); if (!initialized) return NOT_INITIALIZED; \
    if (injected_failure(name)) return OUT_OF_MEMORY; } while (0)

static int count(int kind, int owner, int alive_only) {
    int n = 0;
    for (int i = 0; i < num_objects; i++)
        n += objects[i].kind == kind && (owner < 0 || objects[i].owner == owner) && (objects[i].alive || !alive_only);
    return n;
}

/* A new object; ids count per kind (green 1, green 2, ...; stream 1, ...). */
static Object *make(int kind, unsigned sms, int owner, unsigned flags, int priority) {
    if (num_objects == MAX_OBJECTS) return NULL;
    Object *o = &objects[num_objects];
    *o = (Object){count(kind, -1, 0) + 1, kind, 1, sms, owner, flags, priority, {0}};
    num_objects++;
    return o;
}

/* The object behind a handle from Python, or NULL (recorded) if it is not one this driver made of that kind. */
static Object *lookup(void *handle, int kind, const char *call) {
    for (int i = 0; i < num_objects; i++) {
        if (handle == &objects[i] && objects[i].kind == kind) {
            if (!objects[i].alive) {
                VIOLATION("%s: object %d used after it was destroyed", call, objects[i].id);
                return NULL;
            }
            return &objects[i];
        }
    }
    VIOLATION("%s: a handle this driver never made", call);
    return NULL;
}

CUresult cuInit(unsigned int flags) {
    const char *sms = getenv("FAKE_CUDA_SMS"), *fail = getenv("FAKE_CUDA_FAIL");
    const char *alignment = getenv("FAKE_CUDA_REMAINDER_ALIGNMENT");
    CALL("cuInit");
    if (flags) return INVALID_VALUE;
    if (sms) total_sms = atoi(sms);
    if (total_sms > MAX_SMS) total_sms = MAX_SMS;
    if (alignment) remainder_alignment = atoi(alignment);
    if (fail) {
        const char *colon = strchr(fail, ':');
        snprintf(fail_name, sizeof fail_name, "%.*s", colon ? (int)(colon - fail) : (int)strlen(fail), fail);
        fail_at = colon ? atoi(colon + 1) : -1;
    }
    initialized = 1;
    return SUCCESS;
}

CUresult cuDriverGetVersion(int *version) {
    *version = 13000;
    return SUCCESS;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    switch (error) {
        case SUCCESS: *name = "CUDA_SUCCESS"; return SUCCESS;
        case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; return SUCCESS;
        case OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; return SUCCESS;
        case NOT_INITIALIZED: *name = "CUDA_ERROR_NOT_INITIALIZED"; return SUCCESS;
        case INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; return SUCCESS;
        case INVALID_CONTEXT: *name = "CUDA_ERROR_INVALID_CONTEXT"; return SUCCESS;
        case INVALID_HANDLE: *name = "CUDA_ERROR_INVALID_HANDLE"; return SUCCESS;
        case INVALID_RESOURCE_TYPE: *name = "CUDA_ERROR_INVALID_RESOURCE_TYPE"; return SUCCESS;
        case INVALID_RESOURCE_CONFIGURATION: *name = "CUDA_ERROR_INVALID_RESOURCE_CONFIGURATION"; return SUCCESS;
        default: *name = NULL; return INVALID_VALUE;
    }
}

CUresult cuGetErrorString(CUresult error, const char **text) { return cuGetErrorName(error, text); }

CUresult cuDeviceGetCount(int *count) {
    ENTER("cuDeviceGetCount");
    *count = 1;
    return SUCCESS;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    ENTER("cuDeviceGet");
    if (ordinal != 0) return INVALID_DEVICE;
    *device = 0;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRetain(void **context, CUdevice device) {
    ENTER("cuDevicePrimaryCtxRetain");
    if (device != 0) return INVALID_DEVICE;
    primary_refs++;
    primary_retains++;
    *context = &primary;
    return SUCCESS;
}

CUresult cuDevicePrimaryCtxRelease_v2(CUdevice device) {
    ENTER("cuDevicePrimaryCtxRelease");
    if (device != 0) return INVALID_DEVICE;
    if (primary_refs == 0) {
        VIOLATION("cuDevicePrimaryCtxRelease: the primary context was not retained");
        return INVALID_CONTEXT;
    }
    primary_refs--;
    return SUCCESS;
}

CUresult cuCtxSetCurrent(void *context) {
    ENTER("cuCtxSetCurrent");
    if (context != NULL && context != &primary) {
        VIOLATION("cuCtxSetCurrent: not a context of this driver");
        return INVALID_CONTEXT;
    }
    current = context;
    return SUCCESS;
}

CUresult cuCtxGetCurrent(void **context) {
    ENTER("cuCtxGetCurrent");
    *context = current;
    return SUCCESS;
}

CUresult cuCtxGetStreamPriorityRange(int *least, int *greatest) {
    ENTER("cuCtxGetStreamPriorityRange");
    if (current == NULL) return INVALID_CONTEXT;
    *least = LEAST_PRIORITY;
    *greatest = GREATEST_PRIORITY;
    return SUCCESS;
}

static Origin origin(const CUdevResource *resource) {
    Origin o;
    memcpy(&o, resource->internal_padding, sizeof o);
    return o;
}

static void sm_resource(CUdevResource *resource, unsigned sms, unsigned granularity, unsigned alignment, Origin o) {
    memset(resource, 0, sizeof *resource);
    resource->type = RESOURCE_TYPE_SM;
    resource->sm = (SmResource){sms, granularity, alignment, 0};
    memcpy(resource->internal_padding, &o, sizeof o);
}

/* "0-7,96-131": the SMs of a mask, as ranges. */
static void ranges(const unsigned char *held, char *out, size_t size) {
    *out = 0;
    for (int i = 0; i < MAX_SMS; i++) {
        if (!held[i] || (i > 0 && held[i - 1])) continue;
        int j = i;
        while (j + 1 < MAX_SMS && held[j + 1]) j++;
        size_t at = strlen(out);
        snprintf(out + at, size - at, "%s%d-%d", at ? "," : "", i, j);
    }
}

CUresult cuDeviceGetDevResource(CUdevice device, CUdevResource *resource, int type) {
    ENTER("cuDeviceGetDevResource");
    if (device != 0) return INVALID_DEVICE;
    if (type != RESOURCE_TYPE_SM) return INVALID_RESOURCE_TYPE;
    sm_resource(resource, (unsigned)total_sms, 2, 8, (Origin){0, 0});
    return SUCCESS;
}

CUresult cuDevSmResourceSplitByCount(CUdevResource *result, unsigned int *groups, const CUdevResource *input,
                                     CUdevResource *remainder, unsigned int flags, unsigned int min_count) {
    ENTER("cuDevSmResourceSplitByCount");
    if (input == NULL || groups == NULL || input->type != RESOURCE_TYPE_SM) return INVALID_RESOURCE_TYPE;
    unsigned granularity = flags & SPLIT_IGNORE_SM_COSCHEDULING ? 2 : 8;
    unsigned size = (min_count < granularity ? granularity : min_count + granularity - 1) / granularity * granularity;
    unsigned possible = input->sm.smCount / size;
    if (result == NULL) {
        *groups = possible;
        return SUCCESS;
    }
    if (*groups == 0 || *groups > possible) return INVALID_RESOURCE_CONFIGURATION;
    int split = ++splits_made;
    unsigned first = origin(input).first_sm;
    for (unsigned i = 0; i < *groups; i++)
        sm_resource(&result[i], size, granularity, granularity, (Origin){split, first + i * size});
    if (remainder != NULL)
        sm_resource(remainder, input->sm.smCount - *groups * size, granularity,
                    remainder_alignment ? (unsigned)remainder_alignment : granularity,
                    (Origin){split, first + *groups * size});
    EVENT("split %u SMs flags=%u min=%u: %u x %u + %u", input->sm.smCount, flags, min_count, *groups, size,
         input->sm.smCount - *groups * size);
    return SUCCESS;
}

CUresult cuDevResourceGenerateDesc(void **desc, CUdevResource *resources, unsigned int count) {
    ENTER("cuDevResourceGenerateDesc");
    if (count == 0 || resources == NULL) return INVALID_VALUE;
    unsigned sms = 0;
    for (unsigned i = 0; i < count; i++) {
        if (resources[i].type != RESOURCE_TYPE_SM) return INVALID_RESOURCE_TYPE;
        if (count > 1 && (origin(&resources[i]).split == 0 || origin(&resources[i]).split != origin(resources).split
                          || resources[i].sm.smCoscheduledAlignment != resources[0].sm.smCoscheduledAlignment))
            return INVALID_RESOURCE_CONFIGURATION;
        sms += resources[i].sm.smCount;
    }
    Object *o = make(DESC, sms, -1, 0, 0);
    if (o == NULL) return OUT_OF_MEMORY;
    for (unsigned i = 0; i < count; i++)
        for (unsigned sm = 0; sm < resources[i].sm.smCount; sm++)
            if (origin(&resources[i]).first_sm + sm < MAX_SMS) o->held[origin(&resources[i]).first_sm + sm] = 1;
    *desc = o;
    return SUCCESS;
}

CUresult cuGreenCtxCreate(void **green, void *desc, CUdevice device, unsigned int flags) {
    ENTER("cuGreenCtxCreate");
    Object *d = lookup(desc, DESC, "cuGreenCtxCreate");
    if (d == NULL) return INVALID_HANDLE;
    if (device != 0) return INVALID_DEVICE;
    if (flags != GREEN_CTX_DEFAULT_STREAM) return INVALID_VALUE;
    Object *o = make(GREEN, d->sms, -1, flags, 0);
    if (o == NULL) return OUT_OF_MEMORY;
    memcpy(o->held, d->held, sizeof o->held);
    primary_refs++;  /* "This API will retain the primary context on device" */
    char held[1024];
    ranges(o->held, held, sizeof held);
    EVENT("green %d: %u SMs %s", o->id, o->sms, held);
    *green = o;
    return SUCCESS;
}

CUresult cuGreenCtxStreamCreate(void **stream, void *green, unsigned int flags, int priority) {
    ENTER("cuGreenCtxStreamCreate");
    Object *g = lookup(green, GREEN, "cuGreenCtxStreamCreate");
    if (g == NULL) return INVALID_HANDLE;
    if (!(flags & STREAM_NON_BLOCKING)) return INVALID_VALUE;
    if (priority < GREATEST_PRIORITY) priority = GREATEST_PRIORITY;
    if (priority > LEAST_PRIORITY) priority = LEAST_PRIORITY;
    Object *o = make(STREAM, g->sms, g->id, flags, priority);
    if (o == NULL) return OUT_OF_MEMORY;
    EVENT("stream %d on green %d: priority %d", o->id, g->id, priority);
    *stream = o;
    return SUCCESS;
}

CUresult cuStreamDestroy_v2(void *stream) {
    ENTER("cuStreamDestroy");
    Object *s = lookup(stream, STREAM, "cuStreamDestroy");
    if (s == NULL) return INVALID_HANDLE;
    s->alive = 0;
    EVENT("destroyed stream %d", s->id);
    return SUCCESS;
}

CUresult cuGreenCtxDestroy(void *green) {
    ENTER("cuGreenCtxDestroy");
    Object *g = lookup(green, GREEN, "cuGreenCtxDestroy");
    if (g == NULL) return INVALID_HANDLE;
    int streams = count(STREAM, g->id, 1);
    if (streams) {
        VIOLATION("cuGreenCtxDestroy: green context %d still has %d live stream(s)", g->id, streams);
        return INVALID_CONTEXT;
    }
    g->alive = 0;
    primary_refs--;
    EVENT("destroyed green %d", g->id);
    return SUCCESS;
}

/* Not a driver call: the state as JSON, for the tests (read with ctypes from the process that loaded the driver). */
int fake_cuda_report(char *out, size_t size) {
    char handles[4096] = "";
    for (int i = 0; i < num_objects; i++)
        if (objects[i].kind == STREAM)
            snprintf(handles + strlen(handles), sizeof handles - strlen(handles), "%s%lu", *handles ? "," : "",
                     (unsigned long)&objects[i]);
    return snprintf(out, size,
                    "{\"calls\": [%s], \"events\": [%s], \"violations\": [%s], \"primary_refs\": %d, "
                    "\"primary_retains\": %d, \"live_green_contexts\": %d, \"live_streams\": %d, "
                    "\"current_is_primary\": %s, \"stream_handles\": [%s]}",
                    calls, events, violations, primary_refs, primary_retains, count(GREEN, -1, 1), count(STREAM, -1, 1),
                    current == &primary ? "true" : "false", handles);
}
