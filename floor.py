import subprocess,json,time,statistics,sys,os
srv=subprocess.Popen(['/tmp/ab/cur','--config','/tmp/ab/config.yaml'],stderr=subprocess.DEVNULL)
ref=int(subprocess.check_output(['pgrep','-f','/tmp/ref/kms-server']).split()[0])
time.sleep(0.7)
def bench(port,pid,mode):
    out=subprocess.run(['/tmp/ab/cur','bench','--endpoint',f'https://127.0.0.1:{port}','--ca','/tmp/ab/ca.pem','--server-pid',str(pid),'--output','json','--nodes','500','--mode',mode,'--rate','400','--concurrency','256','--duration','5'],capture_output=True,text=True,check=True).stdout
    d=json.loads(out); return d['latency']['p50_us'],d['latency']['p99_us'],d['server_cpu_us_per_call']
res={}
cases=[('ours-handshake',4050,srv.pid,'handshake'),('ours-unseal',4050,srv.pid,'unseal'),('ref-handshake',4070,ref,'handshake'),('ref-unseal',4070,ref,'unseal')]
for r in range(int(os.environ.get('ROUNDS','3'))):
    for name,port,pid,mode in cases:
        x=bench(port,pid,mode); res.setdefault(name,[]).append(x); print(name,x,flush=True)
for name in res: print(name,'MEDIAN p50 %.0f p99 %.0f cpu %.0f'%tuple(statistics.median(v[i] for v in res[name]) for i in range(3)))
srv.terminate()
