/* A CUDA driver that answers every call at once and runs nothing: with it, Triton compiles
 * kernels for sm_90 and walks its whole host launch path on a machine without a GPU, so the host
 * time of a launch can be timed and launches counted. Built and loaded by bench/standin_cuda.py.
 * Device queries answer as an H200 would (132 SMs, compute capability 9.0). */
#include "cuda.h"

#include <string.h>

static int handle;           /* every context and module is this object */
static long launch_count;
static unsigned long function_count; /* functions are numbered from 1, in the order they are got */

long standin_launch_count(void) { return launch_count; }

/* The launch log, for tests that compare what two launch paths hand the driver: each launch's
 * function, configuration and kernel parameters, the parameters' sizes told beforehand per
 * function (standin_param_sizes), from the kernel's PTX. Off until standin_log(1). */
#define LOG_LAUNCHES 4096
#define MAX_PARAMS 64
#define MAX_FUNCTIONS 1024
struct standin_launch {
  unsigned long function;
  unsigned int grid[3], block[3], shared, attributes;
  unsigned long stream;
  unsigned int params, bytes;
  unsigned char data[MAX_PARAMS * 8];
};
static struct standin_launch launch_log[LOG_LAUNCHES];
static int log_on, logged;
static unsigned int param_count[MAX_FUNCTIONS + 1], param_size[MAX_FUNCTIONS + 1][MAX_PARAMS];

void standin_log(int on) {
  log_on = on;
  logged = 0;
}
int standin_logged(void) { return logged; }
const struct standin_launch *standin_logged_launch(int i) { return &launch_log[i]; }
int standin_param_sizes(unsigned long function, const unsigned int *sizes, unsigned int count) {
  if (function == 0 || function > MAX_FUNCTIONS || count > MAX_PARAMS) return -1;
  memcpy(param_size[function], sizes, count * sizeof *sizes);
  param_count[function] = count;
  return 0;
}

/* The stream a test says is being captured into a CUDA graph (standin_capture), as
 * cuStreamIsCapturing reports it; none until then. */
static int capture_on;
static unsigned long capture_stream;

void standin_capture(unsigned long stream, int on) {
  capture_stream = stream;
  capture_on = on;
}

CUresult CUDAAPI cuInit(unsigned int flags) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuDriverGetVersion(int *version) { *version = 13000; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGetCount(int *count) { *count = 1; return CUDA_SUCCESS; }
CUresult CUDAAPI cuDeviceGet(CUdevice *device, int ordinal) { *device = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuGetErrorString(CUresult error, const char **text) {
  *text = "stand-in driver";
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDeviceGetAttribute(int *value, CUdevice_attribute attribute, CUdevice device) {
  switch (attribute) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *value = 9; break;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *value = 0; break;
    case CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: *value = 132; break;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *value = 32; break;
    case CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_BLOCK: *value = 65536; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: *value = 227 * 1024; break;
    case CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR: *value = 228 * 1024; break;
    default: *value = 1;
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuDevicePrimaryCtxRetain(CUcontext *context, CUdevice device) {
  *context = (CUcontext)&handle;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuCtxGetCurrent(CUcontext *context) {
  *context = (CUcontext)&handle;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuCtxSetCurrent(CUcontext context) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetDevice(CUdevice *device) { *device = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxGetLimit(size_t *value, CUlimit limit) { *value = 0; return CUDA_SUCCESS; }
CUresult CUDAAPI cuCtxSetLimit(CUlimit limit, size_t value) { return CUDA_SUCCESS; }

CUresult CUDAAPI cuModuleLoadData(CUmodule *module, const void *image) {
  *module = (CUmodule)&handle;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuModuleUnload(CUmodule module) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuModuleGetFunction(CUfunction *function, CUmodule module, const char *name) {
  *function = (CUfunction)++function_count;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncGetAttribute(int *value, CUfunction_attribute attribute, CUfunction f) {
  *value = attribute == CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK ? 1024 : 0;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetAttribute(CUfunction f, CUfunction_attribute attribute, int value) {
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuFuncSetCacheConfig(CUfunction f, CUfunc_cache config) { return CUDA_SUCCESS; }
CUresult CUDAAPI cuOccupancyMaxActiveClusters(int *clusters, CUfunction f, const CUlaunchConfig *c) {
  *clusters = 1;
  return CUDA_SUCCESS;
}

/* Host pointers stand for device pointers: Triton's launcher asks which device address a tensor's
 * data pointer is, and gets the pointer back. */
CUresult CUDAAPI cuPointerGetAttribute(void *data, CUpointer_attribute attribute, CUdeviceptr p) {
  if (attribute == CU_POINTER_ATTRIBUTE_DEVICE_POINTER) *(CUdeviceptr *)data = p;
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuPointerGetAttributes(unsigned int n, CUpointer_attribute *attributes, void **data,
                                        CUdeviceptr p) {
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuLaunchKernelEx(const CUlaunchConfig *config, CUfunction f, void **params,
                                  void **extra) {
  launch_count++;
  if (log_on && logged < LOG_LAUNCHES) {
    struct standin_launch *entry = &launch_log[logged++];
    unsigned long function = (unsigned long)f;
    entry->function = function;
    entry->grid[0] = config->gridDimX, entry->grid[1] = config->gridDimY, entry->grid[2] = config->gridDimZ;
    entry->block[0] = config->blockDimX, entry->block[1] = config->blockDimY, entry->block[2] = config->blockDimZ;
    entry->shared = config->sharedMemBytes;
    entry->attributes = config->numAttrs;
    entry->stream = (unsigned long)config->hStream;
    entry->params = entry->bytes = 0;
    if (function >= 1 && function <= MAX_FUNCTIONS) {
      for (unsigned int i = 0; i < param_count[function]; i++) {
        memcpy(entry->data + entry->bytes, params[i], param_size[function][i]);
        entry->bytes += param_size[function][i];
      }
      entry->params = param_count[function];
    }
  }
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuStreamIsCapturing(CUstream stream, CUstreamCaptureStatus *status) {
  *status = capture_on && (unsigned long)stream == capture_stream ? CU_STREAM_CAPTURE_STATUS_ACTIVE
                                                                  : CU_STREAM_CAPTURE_STATUS_NONE;
  return CUDA_SUCCESS;
}

CUresult CUDAAPI cuTensorMapEncodeTiled(CUtensorMap *map, CUtensorMapDataType type, cuuint32_t rank,
                                        void *address, const cuuint64_t *dims,
                                        const cuuint64_t *strides, const cuuint32_t *box,
                                        const cuuint32_t *element_strides,
                                        CUtensorMapInterleave interleave,
                                        CUtensorMapSwizzle swizzle,
                                        CUtensorMapL2promotion promotion,
                                        CUtensorMapFloatOOBfill fill) {
  return CUDA_SUCCESS;
}
CUresult CUDAAPI cuTensorMapEncodeIm2col(CUtensorMap *map, CUtensorMapDataType type,
                                         cuuint32_t rank, void *address, const cuuint64_t *dims,
                                         const cuuint64_t *strides, const int *lower,
                                         const int *upper, cuuint32_t channels,
                                         cuuint32_t pixels, const cuuint32_t *element_strides,
                                         CUtensorMapInterleave interleave,
                                         CUtensorMapSwizzle swizzle,
                                         CUtensorMapL2promotion promotion,
                                         CUtensorMapFloatOOBfill fill) {
  return CUDA_SUCCESS;
}
