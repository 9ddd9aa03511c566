import collections, time
from hypothesis import given, settings, HealthCheck
from tests.accountants.test_cli_fuzz import argument_lists, run_main
stats=collections.Counter(); times=[]
@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(argv=argument_lists())
def t(argv):
    t0=time.time()
    try: code,out,err=run_main(argv)
    except Exception as e: code=type(e).__name__; print("FAIL", code, argv, flush=True)
    dt=time.time()-t0
    stats[code]+=1; times.append((dt, argv))
for i in range(3):
    stats.clear(); times.clear()
    t()
    print(stats, sum(x for x,_ in times)); times.sort(reverse=True); print(times[:3], flush=True)
