package clinragen.hapi;

import ca.uhn.fhir.batch2.jobs.config.Batch2JobsConfig;
import ca.uhn.fhir.batch2.jobs.export.BulkDataExportProvider;
import ca.uhn.fhir.batch2.maintenance.JobMaintenanceServiceImpl;
import ca.uhn.fhir.context.FhirContext;
import ca.uhn.fhir.context.support.IValidationSupport;
import ca.uhn.fhir.jpa.api.config.JpaStorageSettings;
import ca.uhn.fhir.interceptor.api.IInterceptorBroadcaster;
import ca.uhn.fhir.jpa.api.config.ThreadPoolFactoryConfig;
import ca.uhn.fhir.jpa.api.dao.DaoRegistry;
import ca.uhn.fhir.jpa.api.dao.IFhirSystemDao;
import ca.uhn.fhir.jpa.batch2.JpaBatch2Config;
import ca.uhn.fhir.jpa.binary.api.IBinaryStorageSvc;
import ca.uhn.fhir.jpa.binstore.DatabaseBinaryContentStorageSvcImpl;
import ca.uhn.fhir.jpa.config.HapiJpaConfig;
import ca.uhn.fhir.jpa.config.r4.JpaR4Config;
import ca.uhn.fhir.jpa.config.util.HapiEntityManagerFactoryUtil;
import ca.uhn.fhir.jpa.delete.ThreadSafeResourceDeleterSvc;
import ca.uhn.fhir.jpa.interceptor.CascadingDeleteInterceptor;
import ca.uhn.fhir.jpa.model.config.PartitionSettings;
import ca.uhn.fhir.jpa.model.config.SubscriptionSettings;
import ca.uhn.fhir.jpa.model.dialect.HapiFhirH2Dialect;
import ca.uhn.fhir.jpa.model.entity.StorageSettings;
import ca.uhn.fhir.jpa.provider.JpaCapabilityStatementProvider;
import ca.uhn.fhir.jpa.provider.JpaSystemProvider;
import ca.uhn.fhir.jpa.provider.SubscriptionTriggeringProvider;
import ca.uhn.fhir.jpa.search.DatabaseBackedPagingProvider;
import ca.uhn.fhir.jpa.subscription.channel.config.SubscriptionChannelConfig;
import ca.uhn.fhir.jpa.subscription.util.SubscriptionDebugLogInterceptor;
import ca.uhn.fhir.rest.api.EncodingEnum;
import ca.uhn.fhir.rest.server.RestfulServer;
import ca.uhn.fhir.rest.server.provider.ResourceProviderFactory;
import ca.uhn.fhir.rest.server.util.ISearchParamRegistry;
import jakarta.persistence.EntityManagerFactory;
import org.apache.commons.dbcp2.BasicDataSource;
import org.eclipse.jetty.ee10.servlet.ServletContextHandler;
import org.eclipse.jetty.ee10.servlet.ServletHolder;
import org.eclipse.jetty.server.Server;
import org.eclipse.jetty.server.ServerConnector;
import org.eclipse.jetty.util.thread.QueuedThreadPool;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;
import org.springframework.beans.factory.ObjectProvider;
import org.springframework.beans.factory.config.BeanPostProcessor;
import org.springframework.beans.factory.config.ConfigurableListableBeanFactory;
import org.springframework.context.annotation.AnnotationConfigApplicationContext;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;
import org.springframework.context.annotation.Lazy;
import org.springframework.context.annotation.Primary;
import org.springframework.orm.jpa.JpaTransactionManager;
import org.springframework.orm.jpa.LocalContainerEntityManagerFactoryBean;
import org.springframework.transaction.annotation.EnableTransactionManagement;

import javax.sql.DataSource;
import java.io.File;
import java.util.Properties;
import java.util.Set;

/**
 * Minimal HAPI FHIR JPA server (R4) on H2 (file) + embedded Jetty, for local integration tests.
 *
 * <p>What the HAPI "jpaserver-starter" does with Spring Boot and a 1,000-line AppProperties, done
 * here with plain Spring: import HAPI's own JPA configuration ({@link JpaR4Config} -> JpaConfig,
 * {@link HapiJpaConfig}, Batch2 for $expunge/delete-expunge), supply the handful of beans HAPI expects
 * the application to define (DataSource, EntityManagerFactory, TransactionManager, settings),
 * and mount a {@link RestfulServer} with the generated R4 resource providers at /fhir/*.
 *
 * <p>Settings (system property, else environment variable, else default):
 * hapi.host / HAPI_HOST (127.0.0.1), hapi.port / HAPI_PORT (8080),
 * hapi.dataDir / HAPI_DATA_DIR (./.run/hapi), hapi.subscriptions / HAPI_SUBSCRIPTIONS (true: REST-hook
 * subscriptions, matched in memory).
 */
@Configuration
@EnableTransactionManagement
@Import({
	JpaR4Config.class, // R4 FhirContext, DAOs, resource providers, system DAO/provider; imports JpaConfig
	HapiJpaConfig.class, // paging provider, stale-search cleanup, (no-op) full-text service
	ThreadPoolFactoryConfig.class,
	JpaBatch2Config.class, // batch2 job framework: delete-expunge, reindex, ...
	Batch2JobsConfig.class,
	SubscriptionChannelConfig.class // in-memory message broker (LinkedBlockingQueue) used by batch2 + subscriptions
})
public class HapiServer {
	private static final Logger ourLog = LoggerFactory.getLogger(HapiServer.class);

	static String setting(String prop, String env, String dflt) {
		String v = System.getProperty(prop);
		if (v == null || v.isBlank()) v = System.getenv(env);
		return (v == null || v.isBlank()) ? dflt : v;
	}

	static final String HOST = setting("hapi.host", "HAPI_HOST", "127.0.0.1");
	static final int PORT = Integer.parseInt(setting("hapi.port", "HAPI_PORT", "8080"));
	static final File DATA_DIR = new File(setting("hapi.dataDir", "HAPI_DATA_DIR", ".run/hapi")).getAbsoluteFile();
	static final boolean SUBSCRIPTIONS = Boolean.parseBoolean(setting("hapi.subscriptions", "HAPI_SUBSCRIPTIONS", "true"));
	// Bulk Data $export (Patient/Group/system level, Prefer: respond-async): the backfill's fast path
	static final boolean BULK_EXPORT = Boolean.parseBoolean(setting("hapi.bulkExport", "HAPI_BULK_EXPORT", "true"));
	static final int DEFAULT_PAGE_SIZE = 20;
	static final int MAX_PAGE_SIZE = 1000;

	// ---------------------------------------------------------------- storage

	@Bean(destroyMethod = "close")
	public BasicDataSource dataSource() {
		DATA_DIR.mkdirs();
		BasicDataSource ds = new BasicDataSource();
		ds.setDriver(new org.h2.Driver());
		// DB_CLOSE_ON_EXIT=FALSE: the Spring context (shutdown hook) closes the pool, which closes the DB.
		ds.setUrl("jdbc:h2:file:" + new File(DATA_DIR, "h2") + ";DB_CLOSE_ON_EXIT=FALSE");
		ds.setUsername("sa");
		ds.setPassword("");
		ds.setMaxTotal(20);
		ds.setMaxWait(java.time.Duration.ofSeconds(60));
		return ds;
	}

	@Primary
	@Bean
	public LocalContainerEntityManagerFactoryBean entityManagerFactory(
			ConfigurableListableBeanFactory beanFactory,
			DataSource dataSource,
			FhirContext fhirContext,
			JpaStorageSettings storageSettings) {
		LocalContainerEntityManagerFactoryBean emf =
				HapiEntityManagerFactoryUtil.newEntityManagerFactory(beanFactory, fhirContext, storageSettings);
		emf.setPersistenceUnitName("HAPI_PU");
		emf.setDataSource(dataSource);
		Properties p = new Properties();
		p.put("hibernate.dialect", HapiFhirH2Dialect.class.getName());
		p.put("hibernate.hbm2ddl.auto", "update"); // create/upgrade the schema in the H2 file
		p.put("hibernate.jdbc.batch_size", "20");
		p.put("hibernate.format_sql", "false");
		p.put("hibernate.show_sql", "false");
		p.put("hibernate.cache.use_query_cache", "false");
		p.put("hibernate.cache.use_second_level_cache", "false");
		p.put("hibernate.cache.use_structured_entries", "false");
		p.put("hibernate.cache.use_minimal_puts", "false");
		p.put("hibernate.search.enabled", "false"); // no Lucene/Elasticsearch full-text indexing
		emf.setJpaProperties(p);
		return emf;
	}

	@Primary
	@Bean
	public JpaTransactionManager transactionManager(EntityManagerFactory emf) {
		return new JpaTransactionManager(emf);
	}

	@Lazy
	@Bean
	public IBinaryStorageSvc binaryStorageSvc() {
		return new DatabaseBinaryContentStorageSvcImpl();
	}

	// ---------------------------------------------------------------- settings

	@Bean
	public JpaStorageSettings storageSettings() {
		JpaStorageSettings s = new JpaStorageSettings();
		// PUT Patient/<any id, UUIDs included>; ids the server assigns are UUIDs too
		s.setResourceClientIdStrategy(JpaStorageSettings.ClientIdStrategyEnum.ANY);
		s.setResourceServerIdStrategy(JpaStorageSettings.IdStrategyEnum.UUID);
		// tests clean up after themselves
		s.setExpungeEnabled(true);
		s.setDeleteExpungeEnabled(true);
		s.setAllowMultipleDelete(true);
		// DELETE Patient/x?_cascade=delete on a Synthea patient has >1000 referencing resources (default 60/round)
		s.setMaximumDeleteConflictQueryCount(10_000);
		// "Practitioner?identifier=sys|val" references inside transactions are resolved by search
		s.setAllowInlineMatchUrlReferences(true);
		s.setAllowExternalReferences(true);
		s.setTreatBaseUrlsAsLocal(Set.of(
				"http://127.0.0.1:" + PORT + "/fhir", "http://localhost:" + PORT + "/fhir"));
		// ingest speed: no full-text index, no :missing indexes
		s.setHibernateSearchIndexSearchParams(false);
		s.setStoreResourceInHSearchIndex(false);
		s.setIndexMissingFields(StorageSettings.IndexEnabledEnum.DISABLED);
		// paging: allow _count up to MAX_PAGE_SIZE
		s.setFetchSizeDefaultMaximum(MAX_PAGE_SIZE);
		// a repeated search must see writes made in between (tests!), so do not reuse cached results
		s.setReuseCachedSearchResultsForMillis(null);
		// batch2 jobs (DELETE ...&_expunge=true, $reindex) move to their next step as soon as the
		// current one is done instead of on the once-a-minute maintenance pass
		s.setJobFastTrackingEnabled(true);
		return s;
	}

	/** Batch2 maintenance pass every 5 s instead of every 60 s, so async jobs finish in seconds. */
	@Bean
	public static BeanPostProcessor fasterBatch2Maintenance() {
		return new BeanPostProcessor() {
			@Override
			public Object postProcessBeforeInitialization(Object bean, String name) {
				if (bean instanceof JobMaintenanceServiceImpl svc) svc.setScheduledJobFrequencyMillis(5_000);
				return bean;
			}
		};
	}

	@Bean
	public PartitionSettings partitionSettings() {
		return new PartitionSettings(); // partitioning off
	}

	@Bean
	public SubscriptionSettings subscriptionSettings() {
		SubscriptionSettings s = new SubscriptionSettings();
		if (SUBSCRIPTIONS) {
			s.addSupportedSubscriptionType(org.hl7.fhir.dstu2.model.Subscription.SubscriptionChannelType.RESTHOOK);
			s.setEnableInMemorySubscriptionMatching(true); // criteria the in-memory matcher can't do fall back to a DB search
			// writes are queued for matching after commit by a poller (default every 5 s); poll every second
			s.setSubscriptionIntervalInMs(1000);
		}
		return s;
	}

	// ---------------------------------------------------------------- REST layer

	@Bean
	public RestfulServer restfulServer(
			FhirContext fhirContext,
			IFhirSystemDao<?, ?> systemDao,
			ResourceProviderFactory resourceProviderFactory,
			JpaSystemProvider<?, ?> systemProvider,
			DatabaseBackedPagingProvider pagingProvider,
			JpaStorageSettings storageSettings,
			ISearchParamRegistry searchParamRegistry,
			IValidationSupport validationSupport,
			DaoRegistry daoRegistry,
			IInterceptorBroadcaster broadcaster,
			ThreadSafeResourceDeleterSvc deleterSvc,
			ObjectProvider<SubscriptionTriggeringProvider> subscriptionTriggeringProvider,
			ObjectProvider<BulkDataExportProvider> bulkDataExportProvider) {
		// HAPI strips "_history/n" from references by default; a Provenance must say exactly which
		// version of each input it used, so keep versions where provenance and audit records cite them
		// (and a report its results: the readings it cites, as read).
		fhirContext.getParserOptions().setDontStripVersionsFromReferencesAtPaths(
				"Provenance.entity.what", "Provenance.target", "AuditEvent.entity.what",
				"DiagnosticReport.result");
		RestfulServer server = new RestfulServer(fhirContext);
		server.registerProviders(resourceProviderFactory.createProviders()); // one per R4 resource type
		server.registerProvider(systemProvider); // transaction/batch, _history, $expunge, ...
		JpaCapabilityStatementProvider cap = new JpaCapabilityStatementProvider(
				server, systemDao, storageSettings, searchParamRegistry, validationSupport);
		cap.setImplementationDescription("ClinRaGen HAPI FHIR R4 JPA server (H2)");
		server.setServerConformanceProvider(cap);
		pagingProvider.setDefaultPageSize(DEFAULT_PAGE_SIZE);
		pagingProvider.setMaximumPageSize(MAX_PAGE_SIZE);
		server.setPagingProvider(pagingProvider);
		server.setDefaultResponseEncoding(EncodingEnum.JSON);
		// DELETE ...?_cascade=delete also deletes the resources that reference the target (opt-in per request)
		server.registerInterceptor(new CascadingDeleteInterceptor(fhirContext, daoRegistry, broadcaster, deleterSvc));
		if (BULK_EXPORT) {
			server.registerProvider(bulkDataExportProvider.getObject()); // $export, $export-poll-status
		}
		if (SUBSCRIPTIONS) {
			server.registerProvider(subscriptionTriggeringProvider.getObject()); // $trigger-subscription
			server.registerInterceptor(new SubscriptionDebugLogInterceptor()); // logs matching/delivery
		}
		return server;
	}

	// ---------------------------------------------------------------- main

	public static void main(String[] args) throws Exception {
		long t0 = System.nanoTime();
		ourLog.info("Starting HAPI FHIR JPA server: host={} port={} dataDir={} subscriptions={}",
				HOST, PORT, DATA_DIR, SUBSCRIPTIONS);
		AnnotationConfigApplicationContext ctx = new AnnotationConfigApplicationContext();
		ctx.register(HapiServer.class);
		if (SUBSCRIPTIONS) ctx.register(SubscriptionsConfig.class);
		ctx.refresh();

		QueuedThreadPool threads = new QueuedThreadPool(64, 4);
		threads.setName("jetty");
		Server jetty = new Server(threads);
		ServerConnector connector = new ServerConnector(jetty);
		connector.setHost(HOST);
		connector.setPort(PORT);
		jetty.addConnector(connector);
		ServletContextHandler handler = new ServletContextHandler("/");
		ServletHolder holder = new ServletHolder("fhir", ctx.getBean(RestfulServer.class));
		holder.setInitOrder(1);
		handler.addServlet(holder, "/fhir/*");
		jetty.setHandler(handler);
		jetty.setStopTimeout(10_000);

		Runtime.getRuntime().addShutdownHook(new Thread(() -> {
			ourLog.info("Shutting down");
			try {
				jetty.stop();
			} catch (Exception e) {
				ourLog.warn("Jetty stop failed", e);
			}
			ctx.close(); // closes the EntityManagerFactory and the pool -> H2 closes the file cleanly
		}, "hapi-shutdown"));

		jetty.start();
		ourLog.info("HAPI FHIR server started in {} s: http://{}:{}/fhir",
				String.format("%.1f", (System.nanoTime() - t0) / 1e9), HOST, PORT);
		jetty.join();
	}
}
