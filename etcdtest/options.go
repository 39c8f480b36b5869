package etcdtest

import (
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// Default timings. They are short so that clusters start, elect and recover
// in well under a second, yet long enough (a heartbeat every 50ms, elections
// after 500ms of silence) that a 3-member cluster running under the race
// detector on a 2-core machine does not hold spurious elections.
const (
	DefaultHeartbeat       = 50 * time.Millisecond
	DefaultElectionTimeout = 500 * time.Millisecond

	// DefaultStartTimeout bounds how long New, NewCluster and Restart wait
	// for members to become ready and for a leader to be elected.
	DefaultStartTimeout = 30 * time.Second
)

// Option configures a Cluster. Options are applied in order, so a later
// option overrides an earlier one of the same kind. They apply to every
// member and are remembered: Restart starts a member with the same options.
//
// Option is a function on an unexported settings struct, so that new options
// (TLS, authentication, ...) can be added without changing any signature.
type Option func(*settings)

// settings is what the options fill in. Zero values mean "etcd's default",
// except where noted in defaultSettings.
type settings struct {
	heartbeat       time.Duration
	election        time.Duration
	startTimeout    time.Duration
	maxTxnOps       uint
	maxRequestBytes uint
	compactionMode  string
	compactionKeep  string
	logger          *zap.Logger
	configure       []func(member int, cfg *embed.Config)
	fsync           bool
	security        security // WithTLS, WithAuth; see tls.go
}

func defaultSettings() settings {
	return settings{
		heartbeat:    DefaultHeartbeat,
		election:     DefaultElectionTimeout,
		startTimeout: DefaultStartTimeout,
		logger:       zap.NewNop(),
	}
}

// WithFsync makes every member fsync its WAL and backend, as every
// deployment does (etcd's default). Without it the members skip fsync
// (etcd's --unsafe-no-fsync), which makes tests fast and loses nothing a
// test needs, but makes write figures meaningless: benchmarks use it.
func WithFsync() Option {
	return func(s *settings) { s.fsync = true }
}

// WithMaxTxnOps sets the maximum number of operations in one transaction
// (etcd's --max-txn-ops; etcd's default is 128). A transaction with more
// operations fails with rpctypes.ErrTooManyOps.
func WithMaxTxnOps(n uint) Option {
	return func(s *settings) { s.maxTxnOps = n }
}

// WithMaxRequestBytes sets the maximum size of a client request in bytes
// (etcd's --max-request-bytes; etcd's default is 1.5 MiB). A larger request
// fails with rpctypes.ErrRequestTooLarge. Keep n well below the gRPC message
// limit of the client (2 GiB by default) if you want to see etcd's error.
func WithMaxRequestBytes(n uint) Option {
	return func(s *settings) { s.maxRequestBytes = n }
}

// WithAutoCompaction turns on etcd's automatic compaction of the key-value
// history (etcd's --auto-compaction-mode and --auto-compaction-retention).
// mode is embed.CompactorModePeriodic ("periodic", retention is a duration
// such as "1h" or "30s", or a number of hours) or
// embed.CompactorModeRevision ("revision", retention is the number of
// revisions to keep). By default etcdtest, like etcd, does not compact
// automatically. An invalid combination makes New fail.
func WithAutoCompaction(mode, retention string) Option {
	return func(s *settings) {
		s.compactionMode = mode
		s.compactionKeep = retention
	}
}

// WithRaftTiming sets the heartbeat interval and the election timeout
// (etcd's --heartbeat-interval and --election-timeout), overriding
// DefaultHeartbeat and DefaultElectionTimeout. Both are rounded down to whole
// milliseconds; etcd requires election >= 5*heartbeat, and New fails
// otherwise. Shorter timings make failover tests faster but risk spurious
// elections on a loaded machine.
func WithRaftTiming(heartbeat, election time.Duration) Option {
	return func(s *settings) {
		s.heartbeat = heartbeat
		s.election = election
	}
}

// WithStartTimeout bounds how long New, NewCluster and Restart wait for
// members to become ready and for a leader to exist (DefaultStartTimeout by
// default).
func WithStartTimeout(d time.Duration) Option {
	return func(s *settings) { s.startTimeout = d }
}

// WithLogger sends the servers' logs to lg instead of discarding them; each
// member logs through lg.Named("m<i>"). Useful when debugging a failing
// test, e.g. with zaptest.NewLogger(t). The logger must stay usable until
// Close returns. gRPC's global logger is not affected (see the package
// documentation).
func WithLogger(lg *zap.Logger) Option {
	return func(s *settings) {
		if lg == nil {
			lg = zap.NewNop()
		}
		s.logger = lg
	}
}

// WithConfig registers fn to adjust the embed.Config of member i (0-based)
// each time that member is started or restarted, after etcdtest has filled
// it in. It is an escape hatch for settings that have no option of their own
// (quotas, snapshot counts, feature gates, ...). fn must not change the
// name, the data directory, the URLs, the initial cluster or the logger;
// doing so breaks Restart, Endpoints and Close.
func WithConfig(fn func(i int, cfg *embed.Config)) Option {
	return func(s *settings) {
		if fn != nil {
			s.configure = append(s.configure, fn)
		}
	}
}
