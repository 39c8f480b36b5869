// Package etcdtest runs embedded etcd servers (go.etcd.io/etcd/server/v3/embed)
// inside the test process, as a single member or as a cluster of several.
//
//	func TestSomething(t *testing.T) {
//		c := etcdtest.Start(t)   // one member, closed when the test ends
//		cli := c.Client(t)       // closed when the test ends
//		_, err := cli.Put(ctx, "k", "v")
//		...
//	}
//
// Guarantees:
//
//   - Every member listens on 127.0.0.1 only: one client port and one peer
//     port, both chosen among the free ports when the cluster is created and
//     kept for the cluster's lifetime, also across Stop and Restart. Ports
//     are found by listening on 127.0.0.1:0; when one is taken by someone
//     else before etcd binds it (a rare race), New and NewCluster start over
//     with new ports (up to 5 attempts), and Restart tries the same ports
//     again for about two seconds.
//   - Data lives in a private temporary directory, one sub-directory per
//     member, removed by Close. Stop keeps a member's directory so that
//     Restart continues from the same state. Writes are not fsynced
//     (etcd's --unsafe-no-fsync) unless WithFsync is given: durability
//     across a machine crash is irrelevant for most tests, and fsync makes
//     them slow; benchmarks fsync, as deployments do.
//   - The servers log nothing unless WithLogger is given. gRPC's process-wide
//     logger is set to discard everything when this package is initialised,
//     unless one of the environment variables GRPC_GO_LOG_SEVERITY_LEVEL,
//     GRPC_GO_LOG_VERBOSITY_LEVEL or ETCD_CLIENT_DEBUG is set (then gRPC's,
//     or the etcd client's, own choice is left in place). Clients made by
//     Client and MemberClient log nothing either.
//   - New, NewCluster, Start and StartCluster return only when every member
//     is ready to serve clients and a leader has been elected.
//   - Stop returns once the member is down (listeners closed, raft loop
//     exited, storage closed); Close returns once every member is down and
//     etcd's shutdown of each has returned. See Stop, Close and GoleakIgnores
//     for the details and the few goroutines that may outlive Close.
//
// Timing: the default raft timings (DefaultHeartbeat, DefaultElectionTimeout)
// are short but leave room for the race detector on two cores. A single
// member starts in well under a second and closes in milliseconds. A
// 3-member cluster starts in a second or less; its Close takes about one
// second, because etcd's peer HTTP server waits that long for connections
// that its peers keep open (etcd-io/etcd#22389).
//
// A Cluster's methods may be called from several goroutines; they are
// serialised by a mutex (so Leader waits while Stop is stopping a member).
// The functions that take a testing.TB call its Fatal and Cleanup methods and
// therefore belong on the test's goroutine.
package etcdtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"google.golang.org/grpc/grpclog"
)

func init() {
	// grpclog.SetLoggerV2 is not safe to call once gRPC is in use, so it is
	// done here, before any test code runs. Leave the logger alone when the
	// user asked gRPC (or the etcd client, whose init installs its own
	// logger) for logs.
	for _, env := range []string{"GRPC_GO_LOG_SEVERITY_LEVEL", "GRPC_GO_LOG_VERBOSITY_LEVEL", "ETCD_CLIENT_DEBUG"} {
		if os.Getenv(env) != "" {
			return
		}
	}
	grpclog.SetLoggerV2(grpclog.NewLoggerV2(io.Discard, io.Discard, io.Discard))
}

// ErrClosed is returned by Restart after Close.
var ErrClosed = errors.New("etcdtest: cluster is closed")

const (
	// startAttempts is how many times New and NewCluster try fresh ports when
	// a chosen port turns out to be taken.
	startAttempts = 5
	// restartAttempts is how many times Restart tries to bind the member's
	// ports again, with a growing pause, when one of them is taken.
	restartAttempts = 10
	// handOverGrace is how many heartbeats a leader whose last peer has
	// just stopped is given to notice it before the leader is stopped too.
	handOverGrace = 5
	// dialTimeout is the DialTimeout of the clients this package makes.
	dialTimeout = 5 * time.Second
)

// Cluster is a set of embedded etcd members started by New, NewCluster,
// Start or StartCluster. Members are numbered from 0 to N()-1.
type Cluster struct {
	settings settings
	dir      string // parent of the members' data directories
	token    string // initial cluster token, unique per cluster
	initial  string // initial cluster, "m0=http://127.0.0.1:p,..."

	mu       sync.Mutex
	members  []*member
	closed   bool
	lastStop time.Time // when a member last stopped
}

type member struct {
	name      string
	dir       string
	clientURL url.URL
	peerURL   url.URL
	etcd      *embed.Etcd   // nil while stopped
	closing   chan struct{} // closed when the last Stop has finished
}

// Start starts a single-member cluster for the test t, with the given
// options, and registers t.Cleanup(c.Close). It fails the test (t.Fatal) if
// the member cannot be started. On return the member is ready and leader.
func Start(t testing.TB, opts ...Option) *Cluster {
	t.Helper()
	return StartCluster(t, 1, opts...)
}

// StartCluster starts an n-member cluster for the test t (3 is the usual
// size: it survives the loss of one member), with the given options, and
// registers t.Cleanup(c.Close). It fails the test (t.Fatal) if the cluster
// cannot be started. On return every member is ready and a leader exists.
func StartCluster(t testing.TB, n int, opts ...Option) *Cluster {
	t.Helper()
	c, err := NewCluster(n, opts...)
	if err != nil {
		t.Fatalf("etcdtest: starting %d-member etcd cluster: %v", n, err)
	}
	t.Cleanup(c.Close)
	return c
}

// New starts a single-member cluster; see NewCluster. The caller must call
// Close.
func New(opts ...Option) (*Cluster, error) {
	return NewCluster(1, opts...)
}

// NewCluster starts an n-member cluster (n >= 1) on 127.0.0.1 with data in a
// new temporary directory, and waits until every member is ready to serve
// clients and a leader exists (at most the start timeout, see
// WithStartTimeout). The caller must call Close, which also removes the
// data. On error nothing is left running and the directory is removed.
func NewCluster(n int, opts ...Option) (*Cluster, error) {
	if n < 1 {
		return nil, fmt.Errorf("etcdtest: cluster size must be at least 1, got %d", n)
	}
	s := defaultSettings()
	for _, o := range opts {
		o(&s)
	}
	if err := s.security.prepare(); err != nil {
		return nil, fmt.Errorf("etcdtest: %w", err)
	}
	dir, err := os.MkdirTemp("", "etcdtest-")
	if err != nil {
		return nil, fmt.Errorf("etcdtest: %w", err)
	}
	c := &Cluster{settings: s, dir: dir, token: "etcdtest-" + randomHex(8)}
	for attempt := 1; ; attempt++ {
		err = c.bootstrap(n)
		if err == nil {
			if err = c.enableAuth(); err == nil {
				return c, nil
			}
		}
		c.Close()
		if !isAddrInUse(err) || attempt == startAttempts {
			return nil, fmt.Errorf("etcdtest: %w", err)
		}
		// Some chosen port was taken in the meantime: start over with new
		// ports and empty data directories.
		if err := os.MkdirAll(dir, 0o700); err != nil {
			return nil, fmt.Errorf("etcdtest: %w", err)
		}
		c = &Cluster{settings: s, dir: dir, token: "etcdtest-" + randomHex(8)}
	}
}

// bootstrap picks ports, starts all n members of a new cluster and waits for
// them. On error the members started so far are left for Close.
func (c *Cluster) bootstrap(n int) error {
	ports, err := freePorts(2 * n)
	if err != nil {
		return err
	}
	if err := c.writeTLSFiles(); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	peers := make([]string, n)
	for i := range n {
		m := &member{
			name:      "m" + strconv.Itoa(i),
			clientURL: localURL(ports[2*i]),
			peerURL:   localURL(ports[2*i+1]),
		}
		m.dir = filepath.Join(c.dir, m.name)
		m.clientURL.Scheme = c.settings.clientScheme()
		peers[i] = m.name + "=" + m.peerURL.String()
		c.members = append(c.members, m)
	}
	c.initial = strings.Join(peers, ",")
	for i := range c.members {
		if err := c.startLocked(i); err != nil {
			return fmt.Errorf("starting member %d: %w", i, err)
		}
	}
	deadline := time.Now().Add(c.settings.startTimeout)
	for i, m := range c.members {
		if err := waitReady(m.etcd, time.Until(deadline)); err != nil {
			return fmt.Errorf("member %d: %w", i, err)
		}
	}
	for c.leaderLocked() < 0 {
		if time.Now().After(deadline) {
			return fmt.Errorf("no leader elected within %v", c.settings.startTimeout)
		}
		c.mu.Unlock()
		time.Sleep(c.settings.heartbeat)
		c.mu.Lock()
	}
	return nil
}

// config builds the embed configuration of member i.
func (c *Cluster) config(i int) *embed.Config {
	m := c.members[i]
	s := &c.settings
	cfg := embed.NewConfig()
	cfg.Name = m.name
	cfg.Dir = m.dir
	cfg.ListenClientUrls = []url.URL{m.clientURL}
	cfg.AdvertiseClientUrls = []url.URL{m.clientURL}
	cfg.ListenPeerUrls = []url.URL{m.peerURL}
	cfg.AdvertisePeerUrls = []url.URL{m.peerURL}
	// The initial cluster is ignored by a member whose data directory
	// already holds a WAL, so the same values serve for Restart.
	cfg.InitialCluster = c.initial
	cfg.InitialClusterToken = c.token
	cfg.ClusterState = embed.ClusterStateFlagNew
	cfg.TickMs = uint(s.heartbeat / time.Millisecond)
	cfg.ElectionMs = uint(s.election / time.Millisecond)
	if s.maxTxnOps > 0 {
		cfg.MaxTxnOps = s.maxTxnOps
	}
	if s.maxRequestBytes > 0 {
		cfg.MaxRequestBytes = s.maxRequestBytes
	}
	if s.compactionMode != "" {
		cfg.AutoCompactionMode = s.compactionMode
		cfg.AutoCompactionRetention = s.compactionKeep
	}
	cfg.UnsafeNoFsync = !s.fsync
	// The HTTP/JSON gateway dials the member's own gRPC port; tests use the
	// Go client, so spare the connection and its goroutines.
	cfg.EnableGRPCGateway = false
	// The level matters only for etcd's own default logger, which the
	// builder replaces, and at "debug" etcd would also serve pprof.
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(s.logger.Named(m.name))
	c.configureSecurity(cfg)
	for _, fn := range s.configure {
		fn(i, cfg)
	}
	return cfg
}

// startLocked starts member i, which must be stopped. It does not wait for
// the member to become ready.
func (c *Cluster) startLocked(i int) error {
	e, err := embed.StartEtcd(c.config(i))
	if err != nil {
		return err
	}
	c.members[i].etcd = e
	return nil
}

// waitReady waits until e is ready to serve clients, which implies that it
// has joined the cluster through a leader.
func waitReady(e *embed.Etcd, timeout time.Duration) error {
	timer := time.NewTimer(timeout)
	defer timer.Stop()
	select {
	case <-e.Server.ReadyNotify():
		return nil
	case err := <-e.Err():
		if err == nil {
			err = errors.New("server exited")
		}
		return fmt.Errorf("failed before becoming ready: %w", err)
	case <-e.Server.StopNotify():
		return errors.New("server stopped before becoming ready")
	case <-timer.C:
		return fmt.Errorf("not ready within %v", timeout)
	}
}

// N returns the number of members, running or stopped.
func (c *Cluster) N() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return len(c.members)
}

// Member returns the embedded server of member i, or nil while it is
// stopped or after Close. The value changes on every Restart and must not be
// closed by the caller (use Stop). It panics if i is out of range.
func (c *Cluster) Member(i int) *embed.Etcd {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.members[i].etcd
}

// Endpoint returns the client URL of member i ("http://127.0.0.1:port", or
// https with WithTLS), whether or not it is running. It stays the same
// across Stop and Restart. It panics if i is out of range.
func (c *Cluster) Endpoint(i int) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.members[i].clientURL.String()
}

// Endpoints returns the client URLs of the running members, in member order.
// It returns an empty slice after Close.
func (c *Cluster) Endpoints() []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	eps := []string{}
	for _, m := range c.members {
		if m.etcd != nil {
			eps = append(eps, m.clientURL.String())
		}
	}
	return eps
}

// ClientConfig returns a client configuration for the running members
// (Endpoints), with a dial timeout and a logger that discards everything.
// With WithTLS or WithAuth it logs in as root (see WithTLS and WithAuth).
// The caller may change it, e.g. set Endpoints to a single member, before
// passing it to clientv3.New.
func (c *Cluster) ClientConfig() clientv3.Config {
	cfg := clientv3.Config{
		Endpoints:   c.Endpoints(),
		DialTimeout: dialTimeout,
		Logger:      zap.NewNop(),
	}
	c.addCredentials(&cfg)
	return cfg
}

// Client returns a new client connected to the members running at the time
// of the call (Endpoints); it fails over between them on its own. The client
// is closed by t.Cleanup, so cleanups run it before the cluster's Close when
// the cluster was made by Start or StartCluster on the same t. It fails the
// test if no member is running.
func (c *Cluster) Client(t testing.TB) *clientv3.Client {
	t.Helper()
	return newClient(t, c.ClientConfig())
}

// MemberClient returns a new client connected to member i only, whether or
// not it is running at the time of the call. It is closed by t.Cleanup.
func (c *Cluster) MemberClient(t testing.TB, i int) *clientv3.Client {
	t.Helper()
	cfg := c.ClientConfig()
	cfg.Endpoints = []string{c.Endpoint(i)}
	return newClient(t, cfg)
}

func newClient(t testing.TB, cfg clientv3.Config) *clientv3.Client {
	t.Helper()
	cli, err := clientv3.New(cfg)
	if err != nil {
		t.Fatalf("etcdtest: creating client for %v: %v", cfg.Endpoints, err)
	}
	t.Cleanup(func() { _ = cli.Close() })
	return cli
}

// Leader returns the index of the leader, or -1 when there is none. The
// leader is a running member that considers itself leader and is recognised
// as such by a majority of all members (counting stopped ones as dissenting),
// so a member that has just lost its quorum is not reported even before it
// notices and steps down. The answer may be stale as soon as it is returned.
func (c *Cluster) Leader() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leaderLocked()
}

func (c *Cluster) leaderLocked() int {
	quorum := len(c.members)/2 + 1
	for i, m := range c.members {
		if m.etcd == nil {
			continue
		}
		id := m.etcd.Server.MemberID()
		if m.etcd.Server.Leader() != id {
			continue
		}
		votes := 0
		for _, o := range c.members {
			if o.etcd != nil && o.etcd.Server.Leader() == id {
				votes++
			}
		}
		if votes >= quorum {
			return i
		}
	}
	return -1
}

// WaitLeader waits until Leader returns a member and returns it, or returns
// ctx's error.
func (c *Cluster) WaitLeader(ctx context.Context) (int, error) {
	tick := time.NewTicker(c.settings.heartbeat)
	defer tick.Stop()
	for {
		if l := c.Leader(); l >= 0 {
			return l, nil
		}
		select {
		case <-ctx.Done():
			return -1, fmt.Errorf("etcdtest: waiting for a leader: %w", ctx.Err())
		case <-tick.C:
		}
	}
}

// Stop stops member i, if it is running, and keeps its data directory and
// ports for Restart. Stop after Close does nothing. It panics if i is out of
// range.
//
// Stop returns when the member is down: its client and peer listeners are
// closed, its raft loop has exited and its storage is closed. etcd then
// gives the member's open peer connections up to a second to finish (live
// peers keep idle connections open, see etcd-io/etcd#22389); that last part
// of the shutdown runs in the background, and Restart and Close wait for it.
//
// When member i is the leader and another member is running, leadership is
// first handed over to a running member, as etcd does on a graceful
// shutdown, so the cluster has a new leader within a few heartbeats.
func (c *Cluster) Stop(i int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopLocked(i)
}

func (c *Cluster) stopLocked(i int) {
	e := c.members[i].etcd
	if e == nil {
		return
	}
	c.handOver(e)
	<-c.beginStop(i)
	c.lastStop = time.Now()
}

// beginStop marks member i stopped and starts closing it in the background.
// It returns a channel that is closed when the server has stopped; the rest
// of the shutdown goes on, and member.wait waits for it.
func (c *Cluster) beginStop(i int) <-chan struct{} {
	m := c.members[i]
	e := m.etcd
	m.etcd = nil
	// Refuse new peer connections at once; etcd closes its peer listeners
	// only after the server has stopped.
	for _, p := range e.Peers {
		_ = p.Close()
	}
	// Close stops the client gRPC and HTTP servers, then the etcd server
	// (which waits for its raft loop, closes the raft transport, the WAL
	// and the backend, then closes StopNotify), then the peer HTTP servers,
	// and waits for its handler goroutines.
	done := make(chan struct{})
	m.closing = done
	go func() {
		defer close(done)
		e.Close()
	}()
	return e.Server.StopNotify()
}

// handOver moves leadership from e, if it is the leader, to a running
// member. etcd's own shutdown would do the same, but it picks the transferee
// among the peers it still considers connected, which may include a member
// stopped a moment ago, and then waits several seconds for the transfer.
func (c *Cluster) handOver(e *embed.Etcd) {
	s := e.Server
	if s.Leader() != s.MemberID() {
		return
	}
	for _, m := range c.members {
		if m.etcd == nil || m.etcd == e {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 4*c.settings.election)
		// On failure etcd's shutdown tries again on its own.
		_ = s.MoveLeader(ctx, uint64(s.MemberID()), uint64(m.etcd.Server.MemberID()))
		cancel()
		return
	}
	// No other member is running. If one stopped a moment ago, e may still
	// count it as connected: it notices a dead peer when a read fails or,
	// at worst, on the second heartbeat it fails to send. Give it that
	// time, so that etcd's shutdown finds no peer to hand over to and skips
	// the transfer; stop early if e steps down on its own.
	deadline := c.lastStop.Add(handOverGrace * c.settings.heartbeat)
	for s.Leader() == s.MemberID() && time.Now().Before(deadline) {
		time.Sleep(c.settings.heartbeat / 5)
	}
}

// wait waits until the background part of the last Stop of member m is
// over.
func (m *member) wait() {
	if m.closing != nil {
		<-m.closing
		m.closing = nil
	}
}

// Restart starts the stopped member i again with the same name, ports, data
// directory and options. If, counting member i, a majority of the members is
// running, Restart also waits until member i is ready to serve clients,
// which implies that the cluster has a leader; otherwise (e.g. the first
// member restarted after all were stopped) it returns as soon as the member
// is started, and the member becomes ready once enough members are back. On
// error member i is left stopped. Restart returns an error if member i is
// running, and ErrClosed after Close. It panics if i is out of range.
func (c *Cluster) Restart(i int) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	m := c.members[i]
	if m.etcd != nil {
		return fmt.Errorf("etcdtest: member %d is running", i)
	}
	m.wait()
	var err error
	for attempt := 1; attempt <= restartAttempts; attempt++ {
		if err = c.startLocked(i); err == nil || !isAddrInUse(err) {
			break
		}
		// The port is held by someone else, maybe briefly.
		time.Sleep(time.Duration(attempt) * 50 * time.Millisecond)
	}
	if err != nil {
		return fmt.Errorf("etcdtest: restarting member %d: %w", i, err)
	}
	running := 0
	for _, o := range c.members {
		if o.etcd != nil {
			running++
		}
	}
	if running < len(c.members)/2+1 {
		return nil
	}
	if err := waitReady(m.etcd, c.settings.startTimeout); err != nil {
		c.stopLocked(i)
		return fmt.Errorf("etcdtest: restarting member %d: %w", i, err)
	}
	return nil
}

// Close stops every running member and removes the data directory. It
// returns when every member's server has stopped and etcd's shutdown of
// every member has returned (about a second for a cluster of several
// members, see the package documentation). It is idempotent and safe for
// concurrent use: other calls wait for the first one and then do nothing.
//
// Close the cluster's clients first (Client and MemberClient arrange for
// that): etcd gives open requests and watches up to its request timeout
// (5s plus two election timeouts) before it cuts them off.
func (c *Cluster) Close() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return
	}
	c.closed = true
	// Stop the followers together, then the leader: no leadership moves
	// around, and the leader, alone, skips etcd's leadership transfer.
	last := -1
	for i, m := range c.members {
		if m.etcd != nil && m.etcd.Server.Leader() == m.etcd.Server.MemberID() {
			last = i
		}
	}
	var stopped []<-chan struct{}
	for i, m := range c.members {
		if m.etcd != nil && i != last {
			stopped = append(stopped, c.beginStop(i))
		}
	}
	for _, ch := range stopped {
		<-ch
	}
	if len(stopped) > 0 {
		c.lastStop = time.Now()
	}
	if last >= 0 {
		c.stopLocked(last)
	}
	for _, m := range c.members {
		m.wait()
	}
	_ = os.RemoveAll(c.dir)
}

// freePorts returns n distinct ports that were free on 127.0.0.1. All
// listeners are held until the last one is open, so the ports differ.
func freePorts(n int) ([]int, error) {
	ports := make([]int, 0, n)
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			return nil, fmt.Errorf("finding a free port: %w", err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports, nil
}

func localURL(port int) url.URL {
	return url.URL{Scheme: "http", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(port))}
}

func isAddrInUse(err error) bool {
	return errors.Is(err, syscall.EADDRINUSE) || strings.Contains(err.Error(), "address already in use")
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
