// The FLOP peak of one core, measured (issue 24: "the Gram within 1.5x of the FLOP peak of the cores it runs on").
// 12 independent FMA chains per width keep both FMA pipes busy; the clock comes from a chain of dependent integer
// adds (one per cycle). Thread CPU time, best of 5.  gcc -O2 -o /tmp/fma_peak bench/fma_peak.c && /tmp/fma_peak
#include <immintrin.h>
#include <stdio.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_THREAD_CPUTIME_ID,&t);return t.tv_sec+1e-9*t.tv_nsec;}
__attribute__((target("avx2,fma"))) float run256(long n){
  __m256 a0=_mm256_set1_ps(1),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0,a8=a0,a9=a0,a10=a0,a11=a0;
  __m256 x=_mm256_set1_ps(0.999999f), y=_mm256_set1_ps(1e-7f);
  for(long i=0;i<n;i++){
#define F(a) a=_mm256_fmadd_ps(a,x,y);
    F(a0)F(a1)F(a2)F(a3)F(a4)F(a5)F(a6)F(a7)F(a8)F(a9)F(a10)F(a11)
    __asm__ volatile("" : "+x"(a0),"+x"(a1),"+x"(a2),"+x"(a3),"+x"(a4),"+x"(a5),"+x"(a6),"+x"(a7),"+x"(a8),"+x"(a9),"+x"(a10),"+x"(a11));
  }
  __m256 s=_mm256_add_ps(_mm256_add_ps(_mm256_add_ps(a0,a1),_mm256_add_ps(a2,a3)),_mm256_add_ps(_mm256_add_ps(a4,a5),_mm256_add_ps(_mm256_add_ps(a6,a7),_mm256_add_ps(_mm256_add_ps(a8,a9),_mm256_add_ps(a10,a11)))));
  return s[0];
}
__attribute__((target("avx512f"))) float run512(long n){
  __m512 a0=_mm512_set1_ps(1),a1=a0,a2=a0,a3=a0,a4=a0,a5=a0,a6=a0,a7=a0,a8=a0,a9=a0,a10=a0,a11=a0;
  __m512 x=_mm512_set1_ps(0.999999f), y=_mm512_set1_ps(1e-7f);
  for(long i=0;i<n;i++){
#define G(a) a=_mm512_fmadd_ps(a,x,y);
    G(a0)G(a1)G(a2)G(a3)G(a4)G(a5)G(a6)G(a7)G(a8)G(a9)G(a10)G(a11)
    __asm__ volatile("" : "+v"(a0),"+v"(a1),"+v"(a2),"+v"(a3),"+v"(a4),"+v"(a5),"+v"(a6),"+v"(a7),"+v"(a8),"+v"(a9),"+v"(a10),"+v"(a11));
  }
  __m512 s=_mm512_add_ps(_mm512_add_ps(_mm512_add_ps(a0,a1),_mm512_add_ps(a2,a3)),_mm512_add_ps(_mm512_add_ps(a4,a5),_mm512_add_ps(_mm512_add_ps(a6,a7),_mm512_add_ps(_mm512_add_ps(a8,a9),_mm512_add_ps(a10,a11)))));
  return _mm512_reduce_add_ps(s);
}
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
