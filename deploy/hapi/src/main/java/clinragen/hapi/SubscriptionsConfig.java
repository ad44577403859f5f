package clinragen.hapi;

import ca.uhn.fhir.jpa.subscription.match.config.SubscriptionProcessorConfig;
import ca.uhn.fhir.jpa.subscription.match.deliver.email.IEmailSender;
import ca.uhn.fhir.jpa.subscription.submit.config.SubscriptionSubmitterConfig;
import ca.uhn.fhir.jpa.topic.SubscriptionTopicConfig;
import org.springframework.context.annotation.Bean;
import org.springframework.context.annotation.Configuration;
import org.springframework.context.annotation.Import;

/**
 * REST-hook subscription processing inside this JVM: the submitter (intercepts writes), the processor
 * (in-memory matching + delivery) and topic support, all over the in-memory channels of
 * SubscriptionChannelConfig. Registered by {@link HapiServer#main} only when hapi.subscriptions=true
 * (a separate top-level class, because Spring would pick up a nested configuration class unconditionally).
 */
@Configuration
@Import({SubscriptionSubmitterConfig.class, SubscriptionProcessorConfig.class, SubscriptionTopicConfig.class})
public class SubscriptionsConfig {
	/** Required by the processor's delivery factory; email channels are not enabled here. */
	@Bean
	public IEmailSender emailSender() {
		return details -> {
			throw new UnsupportedOperationException("email subscriptions are not configured");
		};
	}
}
