B=/work/main/target/release/mqttd-bench
echo "uptime before: $(uptime)"
for rate in 20 50; do for rep in 1 2 3; do
$B hol --quic-port 27567 -p 27883 -d 10 --drain 5 --bulk-rate $rate --seed $rep
$B hol --multi-stream --quic-port 28567 -p 28883 -d 10 --drain 5 --bulk-rate $rate --seed $rep
done; done
echo "uptime after: $(uptime)"
