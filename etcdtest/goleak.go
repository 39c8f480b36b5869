package etcdtest

import "go.uber.org/goleak"

// GoleakIgnores lists the goroutines that embedded etcd may leave behind for
// a few seconds after Close, for go.uber.org/goleak:
//
//	func TestMain(m *testing.M) {
//		goleak.VerifyTestMain(m, etcdtest.GoleakIgnores...)
//	}
//
// A single-member cluster leaves nothing behind: its goroutines have all
// exited when Close returns. A cluster of several members leaves HTTP
// connections between members open for up to 5 seconds (etcd's peer read
// timeout, rafthttp.ConnReadTimeout) after Close, with these goroutines:
//
//   - on the serving side, net/http's (*conn).serve blocked in
//     (*connReader).abortPendingRead, and its background reader blocked in a
//     read through cmux. The peer HTTP server of etcd wraps connections in a
//     timeout conn that resets the read deadline on every Read, which defeats
//     net/http's way of cancelling the background read after a short request
//     (the leader, for one, asks its peers for their version every four
//     seconds). Such a
//     connection stays active until the deadline passes, so etcd's shutdown,
//     which gives the peer server one second, leaves it open (see
//     etcd-io/etcd#22389);
//   - on the dialling side, the idle keep-alive connection's
//     (*persistConn).readLoop and writeLoop in net/http: etcd never closes
//     the idle connections of the HTTP transport its server uses to query
//     peers, so they end only when the serving side closes them.
//
// The first two entries are specific to etcd (cmux, and net/http server
// connections stuck in abortPendingRead). The last two also hide idle
// keep-alive connections of any other net/http client in the process; if
// that matters, verify with goleak.VerifyNone in the tests that use no
// multi-member cluster, or wait about 5 seconds after the last Close before
// checking, instead of using these two.
var GoleakIgnores = []goleak.Option{
	goleak.IgnoreAnyFunction("net/http.(*connReader).abortPendingRead"),
	goleak.IgnoreAnyFunction("github.com/soheilhy/cmux.(*MuxConn).Read"),
	goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
	goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
}
