// The FLOP peak of one core, measured (issue 24: "the Gram within 1.5x of the FLOP peak of the cores it runs on").
// 12 independent FMA chains per width keep both FMA pipes busy; the clock comes from a chain of dependent integer
// adds (one per cycle). Thread CPU time, best of 5.  gcc -O2 -o /tmp/fma_peak bench/fma_peak.c && /tmp/fma_peak
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+1e-9*t.tv_nsec;}
// One kernel per width: 12 accumulators a = a*x + y, kept in registers by the empty asm (constraint C: "x" for
// ymm, "v" for zmm), summed at the end so the work is not dead.
#define FMA_RUN(NAME, TARGET, V, SET1, FMADD, ADD, C)                                                        \
  __attribute__((target(TARGET))) float NAME(long n) {                                                       \
    V a0 = SET1(1), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0, a8 = a0, a9 = a0, a10 = a0, \
      a11 = a0;                                                                                              \
    V x = SET1(0.999999f), y = SET1(1e-7f);                                                                  \
    for (long i = 0; i < n; i++) {                                                                           \
      a0 = FMADD(a0, x, y); a1 = FMADD(a1, x, y); a2 = FMADD(a2, x, y); a3 = FMADD(a3, x, y);                \
      a4 = FMADD(a4, x, y); a5 = FMADD(a5, x, y); a6 = FMADD(a6, x, y); a7 = FMADD(a7, x, y);                \
      a8 = FMADD(a8, x, y); a9 = FMADD(a9, x, y); a10 = FMADD(a10, x, y); a11 = FMADD(a11, x, y);            \
      __asm__ volatile("" : "+" C(a0), "+" C(a1), "+" C(a2), "+" C(a3), "+" C(a4), "+" C(a5), "+" C(a6),     \
                       "+" C(a7), "+" C(a8), "+" C(a9), "+" C(a10), "+" C(a11));                             \
    }                                                                                                        \
    V s = ADD(ADD(ADD(a0, a1), ADD(a2, a3)), ADD(ADD(a4, a5), ADD(ADD(a6, a7), ADD(ADD(a8, a9), ADD(a10, a11))))); \
    return s[0];                                                                                             \
  }
FMA_RUN(run256, "avx2,fma", __m256, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_add_ps, "x")
FMA_RUN(run512, "avx512f", __m512, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_add_ps, "v")
__attribute__((target("avx2,fma"))) long cyc(long n){ long x=0; for(long i=0;i<n;i++){ __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x)); } return x; }
int main(){
  long n=200000000;
  double best256=1e9,best512=1e9,bc=1e9; float s=0;
  for(int r=0;r<5;r++){double t=now(); s+=run256(n); double d=now()-t; if(d<best256)best256=d;
                       t=now(); s+=run512(n/2); d=now()-t; if(d<best512)best512=d;
                       t=now(); cyc(n/4); d=now()-t; if(d<bc)bc=d;}
  double ghz = (double)n/bc/1e9; /* n/4 iterations x 4 dependent adds = n cycles */
  double g256=12.0*8*2*n/best256/1e9, g512=12.0*16*2*(n/2)/best512/1e9;
  printf("clock %.2f GHz (dependent adds)\n", ghz);
  printf("AVX2 FMA: %.1f GFLOP/s = %.2f FMA/cycle (ymm)\n", g256, 12.0*n/best256/1e9/ghz);
  printf("AVX-512 FMA: %.1f GFLOP/s = %.2f FMA/cycle (zmm)\n", g512, 12.0*(n/2)/best512/1e9/ghz);
  return s==12345;
}
