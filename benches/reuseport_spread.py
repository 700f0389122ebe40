# How evenly do connections spread over 2 workers, with a shared listening
# socket and with reuseport? Prints connections per worker (from /metrics)
# for 3 runs of each. Run from anywhere after `cargo build --workspace`.
import os, re, socket, subprocess, time, urllib.request
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get('CARGO_TARGET_DIR', os.path.join(ROOT, 'target'))
def run(reuseport, conns=1000, concurrent=False):
    cfg=f'''[server]
workers = 2
[admin]
addr = "127.0.0.1:9101"
[[plugins]]
name = "upper"
path = "{TARGET}/debug/libupper.so"
[[listeners]]
addr = "127.0.0.1:9050"
plugin = "upper"
reuseport = {str(reuseport).lower()}
'''
    open('/tmp/nbnet-spread.toml','w').write(cfg)
    p=subprocess.Popen([os.path.join(TARGET,'debug','nbnet'),'--config','/tmp/nbnet-spread.toml'],stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    if concurrent:
        socks=[socket.create_connection(('127.0.0.1',9050)) for _ in range(conns)]
        for s in socks: s.sendall(b'0000000001x')
        for s in socks: s.recv(20); s.close()
    else:
        for i in range(conns):
            t=socket.create_connection(('127.0.0.1',9050)); t.sendall(b'0000000001x'); t.recv(20); t.close()
    m=urllib.request.urlopen('http://127.0.0.1:9101/metrics').read().decode()
    p.terminate(); p.wait()
    return [int(x) for x in re.findall(r'nbnet_connections_total\{worker="\d",pid="\d+"\} (\d+)', m)]
for mode in (False, True):
    for conc in (False, True):
        print('reuseport' if mode else 'shared   ', 'concurrent' if conc else 'sequential', [run(mode, 1000, conc) for _ in range(3)])
